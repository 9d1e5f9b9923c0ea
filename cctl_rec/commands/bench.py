"""``cctl-rec bench WHAT``: measured benchmarks, written as JSON (and printed).

- ``datagen``: generator rows/s per worker (generation alone and with the Parquet write), bytes
  per row, peak RSS per worker, and the extrapolated time of the full ``meituan`` preset.
"""

from __future__ import annotations

import argparse
import json

from cctl_rec.data.manifest import atomic_write_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (datagen)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["datagen"], help="what to measure")
    p.add_argument("--preset", default="small", help="datagen preset whose id spaces are used")
    p.add_argument("--rows", type=int, default=2_000_000, help="rows per measurement")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cores", type=int, default=64, help="core count for the meituan extrapolation")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datagen.bench import bench_datagen
    from datagen.presets import resolve

    resolve(args.preset)  # unknown preset: one clear line before any work
    res = bench_datagen(args.preset, args.rows, args.workers, args.cores)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0
