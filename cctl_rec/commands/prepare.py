"""``cctl-rec prepare``: your own two-domain Parquet logs + a feature config -> a cctl-rec dataset.

Raw ids (int64 or string, nulls allowed, list columns for the behaviour sequence) become embedding
rows by a stable hash into N buckets or a vocabulary built in one pass over the train splits (min
count, an out-of-vocabulary row 0); dense columns are standardised with the train split's mean and
std. The output is the layout `cctl-rec train` reads (Parquet shards + manifest.json, written last);
the mapping is recorded in OUT/features/ (features.json, vocab/<space>.parquet) so the same raw
columns can be mapped again at serving time. Bad input (a missing column, a declared int column
holding strings, a bucket count of 0, a vocabulary from another dataset, NaN in a dense column):
one line, exit 2, before anything is written. Guide: docs/features.md.

Example::

    cctl-rec prepare --features configs/features/amazon.yaml --data raw/amazon --out data/amazon-raw
    cctl-rec train --config configs/dnn_amazon.yaml --data data/amazon-raw --run-dir runs/raw
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="map your own two-domain Parquet logs into a cctl-rec dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="feature config YAML (docs/features.md)")
    p.add_argument("--data", required=True, help="raw data root; the config's domains.<d>.files are relative to it")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per output Parquet shard (default 1000000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cctl_rec.data.features.prepare import prepare

    m = prepare(args.features, args.data, args.out, args.shard_rows)
    st = m["stats"]
    rows = ", ".join(f"{k} {v['rows']}" for k, v in st["splits"].items())
    spaces = ", ".join(f"{n} {s['kind']} {s['rows']} rows" for n, s in st["spaces"].items())
    oov = ", ".join(f"{f} {share:.2%}" for f, share in st["splits"]["tgt/test"]["oov_share"].items() if share)
    print(f"wrote {args.out}: {rows} rows; spaces: {spaces}; tgt/test out-of-vocabulary: {oov or 'none'}")
    return 0
