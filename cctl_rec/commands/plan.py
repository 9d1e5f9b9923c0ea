"""``cctl-rec plan``: a dry-run TorchRec sharding plan for every table CCTL trains.

Runs the planner on meta-device tables of a preset's (or dataset's) schema: nothing is allocated
and no GPU is needed. Prints each table's sharding and per-rank memory (weights + sparse
optimizer state), writes JSON.
"""

from __future__ import annotations

import argparse
import json

from cctl_rec.data.manifest import atomic_write_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="dry-run sharding plan (no GPU needed)", description=__doc__,
                       epilog="example: cctl-rec plan --preset meituan --world-size 16 --device cuda --hbm-gb 80 "
                              "--sharding auto --out plan.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="datagen preset: tiny, small or meituan")
    src.add_argument("--data", help="a dataset root (its manifest's schema)")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per rank (cuda)")
    p.add_argument("--ddr-gb", type=float, default=None, help="host memory per rank")
    p.add_argument("--sharding", default="auto",
                   help="auto, data_parallel, table_wise, column_wise, table_column_wise, row_wise, table_row_wise")
    p.add_argument("--batch-size", type=int, default=8192, help="per-rank batch (the paper: 8192 industrial)")
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(func=run)


def schemas_for(args: argparse.Namespace):
    if args.data:
        from cctl_rec.data.loader import Dataset

        return Dataset(args.data).schemas
    from datagen.pipeline import schemas_of
    from datagen.presets import resolve

    return schemas_of(resolve(args.preset))


def run(args: argparse.Namespace) -> int:
    from cctl_rec.distributed.plan_report import plan_model

    if args.world_size <= 0:
        raise ValueError(f"--world-size must be > 0, got {args.world_size}")
    if args.batch_size <= 0 or args.embedding_dim <= 0 or args.hbm_gb <= 0:
        raise ValueError("--batch-size, --embedding-dim and --hbm-gb must be > 0")
    rep = plan_model(schemas_for(args), args.world_size, args.device, args.hbm_gb, args.ddr_gb, args.sharding,
                     args.batch_size, args.embedding_dim)
    big = sorted(rep["tables"], key=lambda t: -t["gb"])
    hbm = f"{rep['hbm_gb_per_rank']:g} GB HBM + " if rep["hbm_gb_per_rank"] else ""
    print(f"{rep['device']} x {rep['world_size']}, {hbm}{rep['ddr_gb_per_rank']:g} GB host per rank, sharding="
          f"{rep['sharding']}: peak {rep['peak_gb']:.2f} GB per rank (tables + optimizer state), total "
          f"{rep['total_gb']:.2f} GB; UVM (host-resident) tables: {', '.join(rep['uvm_tables']) or 'none'}")
    print("largest tables:")
    for t in big[:8]:
        print(f"  {t['module']:<10} {t['table']:<14} {t['rows']:>12,} x {t['dim']}  {t['gb']:8.2f} GB  "
              f"{t['sharding']:<18} {t['kernel']:<18} ranks {t['ranks'][:8]}{'...' if len(t['ranks']) > 8 else ''}")
    print("per-rank GB: " + " ".join(f"{x:.2f}" for x in rep["per_rank_gb"]))
    if args.out:
        atomic_write_bytes(args.out, (json.dumps({k: v for k, v in rep.items() if k != "plan_text"}, indent=2)
                                      + "\n").encode())
    return 0
