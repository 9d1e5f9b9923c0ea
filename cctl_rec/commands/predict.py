"""``cctl-rec predict``: batch scoring of target-schema Parquet with an exported model.

``--data`` is a Parquet file, a directory of Parquet files, or a dataset root (then ``--split``,
default tgt/test). Writes Parquet with ``row``, ``logit``, ``prob`` (and ``label`` when the input
has one), atomically.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="score Parquet rows with an exported model", description=__doc__)
    p.add_argument("--model", required=True, help="a `cctl-rec export` directory")
    p.add_argument("--data", required=True, help="Parquet file, directory, or dataset root")
    p.add_argument("--split", default="tgt/test", help="split of a dataset root (default tgt/test)")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--batch-size", type=int, default=8192)
    p.set_defaults(func=run)


def input_files(data: str, split: str) -> list[str]:
    if os.path.isfile(data):
        return [data]
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    if os.path.exists(os.path.join(data, "manifest.json")):
        from cctl_rec.data.manifest import read_manifest, shard_paths

        m = read_manifest(data)
        if not m["splits"].get(split):
            raise ValueError(f"dataset {data} has no split {split!r}; it has {sorted(m['splits'])}")
        return shard_paths(data, m, split)
    files = sorted(glob.glob(os.path.join(data, "**", "*.parquet"), recursive=True))
    if not files:
        raise FileNotFoundError(f"--data {data} holds no .parquet files")
    return files


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tqdm import tqdm

    from cctl_rec.data.manifest import atomic_write_bytes
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.export import load_artifact, serving_inputs

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out directory {out_dir} does not exist")
    if os.path.isdir(args.out):
        raise IsADirectoryError(f"--out {args.out} is a directory; expected a .parquet file path")
    model, meta = load_artifact(args.model)
    schema, L = model.schema, int(meta["max_seq_len"])
    stream = ParquetStream(input_files(args.data, args.split), schema, args.batch_size, drop_last=False,
                           with_meta=False)
    logits, labels = [], []
    with torch.no_grad():
        for rows in tqdm(stream, total=stream.num_batches(), mininterval=5, desc="predict", unit="batch"):
            logits.append(model(*serving_inputs(model, rows.table, L, rows.path)).numpy())
            if "label" in rows.table.column_names:
                labels.append(rows.table.column("label").to_numpy())
    z = np.concatenate(logits).astype(np.float32)
    cols = {"row": pa.array(np.arange(z.size, dtype=np.int64)), "logit": pa.array(z),
            "prob": pa.array((1 / (1 + np.exp(-z.astype(np.float64)))).astype(np.float32))}
    if labels and sum(len(x) for x in labels) == z.size:
        cols["label"] = pa.array(np.concatenate(labels))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    atomic_write_bytes(args.out, buf.getvalue())
    print(json.dumps({"out": args.out, "rows": int(z.size)}))
    return 0
