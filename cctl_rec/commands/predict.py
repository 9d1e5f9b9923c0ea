"""``cctl-rec predict``: batch scoring of target-schema Parquet with an exported model.

``--data`` is a Parquet file, a directory of Parquet files, or a dataset root (then ``--split``,
default tgt/test). Writes Parquet with ``row``, ``logit``, ``prob`` (and ``label`` when the input
has one), then the ``--reserved-columns`` copied from the input unchanged (request or user ids),
atomically.

Raw ids: when the export carries a feature map (trained on a ``cctl-rec prepare`` dataset), files
and directories are read as raw logs with the raw columns the feature config names, mapped the way
prepare mapped the training data; an id never seen in training lands on the reserved row 0. A
dataset root (``manifest.json``) holds rows already and is read as is.
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
    p.add_argument("--reserved-columns", default="",
                   help="comma-separated input columns copied to the output unchanged, e.g. request_id,user_id")
    p.set_defaults(func=run)


def input_files(data: str, split: str) -> list[str]:
    """The Parquet files ``--data`` names (local path or URL): a file, a dataset root's split, or
    every ``*.parquet`` below a directory, sorted."""
    from iopath.common.file_io import g_pathmgr

    from cctl_rec.data.manifest import is_local, join

    if g_pathmgr.isfile(data):
        return [data]
    if not g_pathmgr.isdir(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    if g_pathmgr.exists(join(data, "manifest.json")):
        from cctl_rec.data.manifest import read_manifest, shard_paths

        m = read_manifest(data)
        if not m["splits"].get(split):
            raise ValueError(f"dataset {data} has no split {split!r}; it has {sorted(m['splits'])}")
        return shard_paths(data, m, split)
    if is_local(data):
        files = sorted(glob.glob(os.path.join(data, "**", "*.parquet"), recursive=True))
    else:
        from cctl_rec.storage import filesystem, scheme_of

        scheme = scheme_of(data)
        found = filesystem(scheme).glob(data.rstrip("/") + "/**/*.parquet")
        files = sorted(p if "://" in p else f"{scheme}://{p}" for p in found)
    if not files:
        raise FileNotFoundError(f"--data {data} holds no .parquet files")
    return files


OUTPUT_COLUMNS = ("row", "logit", "prob", "label")


def reserved_columns(spec: str, first_file: str) -> list[str]:
    """The ``--reserved-columns`` names, each checked against the first input file's columns."""
    names = [c.strip() for c in spec.split(",") if c.strip()]
    if not names:
        return []
    clash = [c for c in names if c in OUTPUT_COLUMNS]
    if clash:
        raise ValueError(f"--reserved-columns {clash} would overwrite predict's own output columns "
                         f"{list(OUTPUT_COLUMNS)}; rename them in the input")
    from cctl_rec.data.reader import open_parquet

    with open_parquet(first_file) as pf:
        have = pf.schema_arrow.names
    missing = [c for c in names if c not in have]
    if missing:
        raise ValueError(f"--reserved-columns {missing} not in {first_file}; it has columns {have}")
    if len(set(names)) != len(names):
        raise ValueError(f"--reserved-columns names a column twice: {names}")
    return names


def raw_batches(files: list[str], fmap, batch_size: int):
    """(raw table, mapped table, label column name, path) per batch of raw logs, mapped by ``fmap``."""
    import pyarrow as pa

    dom = fmap.spec.domain("tgt")
    need = [f.source_column for f in dom.features] + ([dom.other_seq.column] if dom.other_seq else [])
    from cctl_rec.data.reader import open_parquet

    for path in files:
        pf = open_parquet(path)
        missing = [c for c in need if c not in pf.schema_arrow.names]
        if missing:
            raise ValueError(f"raw input {path} lacks column(s) {missing} that the export's feature map reads "
                             f"(features/features.json); expected the raw target logs the model was prepared from")
        for rb in pf.iter_batches(batch_size=batch_size):
            raw = pa.Table.from_batches([rb])
            yield raw, pa.table(fmap.map_features("tgt", raw, path)), dom.label.column, path


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from cctl_rec.data.manifest import atomic_write_bytes
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.export import load_artifact, local_export, serving_inputs
    from cctl_rec.logging_utils import progress

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    from iopath.common.file_io import g_pathmgr

    from cctl_rec.data.manifest import is_local

    if is_local(args.out):  # a URL's bucket was checked by the CLI (storage.check_location)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--out directory {out_dir} does not exist")
    if g_pathmgr.isdir(args.out):
        raise IsADirectoryError(f"--out {args.out} is a directory; expected a .parquet file path")
    model_dir = local_export(args.model)  # a URL: downloaded once into the cache
    model, meta = load_artifact(model_dir)
    schema, L = model.schema, int(meta["max_seq_len"])
    files = input_files(args.data, args.split)
    keep = reserved_columns(args.reserved_columns, files[0])
    from cctl_rec.data.manifest import join

    is_root = g_pathmgr.isdir(args.data) and g_pathmgr.exists(join(args.data, "manifest.json"))
    if meta.get("features") and not is_root:
        from cctl_rec.data.features.transform import FeatureMap

        batches = raw_batches(files, FeatureMap.load(model_dir), args.batch_size)
    else:
        stream = ParquetStream(files, schema, args.batch_size, drop_last=False, with_meta=False)
        batches = ((r.table, r.table, "label", r.path) for r in stream)
    logits, labels, kept = [], [], {c: [] for c in keep}
    with torch.no_grad():
        for raw, rows, label, path in progress(batches, mininterval=5, desc="predict", unit="batch"):
            logits.append(model(*serving_inputs(model, rows, L, path)).numpy())
            if label in raw.column_names:
                labels.append(raw.column(label).to_numpy())
            for c in keep:
                kept[c].append(raw.column(c))
    z = np.concatenate(logits).astype(np.float32) if logits else np.zeros(0, np.float32)
    cols = {"row": pa.array(np.arange(z.size, dtype=np.int64)), "logit": pa.array(z),
            "prob": pa.array((1 / (1 + np.exp(-z.astype(np.float64)))).astype(np.float32))}
    if labels and sum(len(x) for x in labels) == z.size:
        cols["label"] = pa.array(np.concatenate(labels))
    for c in keep:
        cols[c] = pa.chunked_array([ch for part in kept[c] for ch in part.chunks], type=kept[c][0].type) \
            if kept[c] else pa.array([], pa.null())
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    atomic_write_bytes(args.out, buf.getvalue())
    print(json.dumps({"out": args.out, "rows": int(z.size)}))
    return 0
