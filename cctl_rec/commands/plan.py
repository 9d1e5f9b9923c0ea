"""``cctl-rec plan``: a dry-run TorchRec sharding plan for every table CCTL trains.

Runs the planner on meta-device tables of a preset's (or dataset's) schema: nothing is allocated
and no GPU is needed. Prints the planner's stats table, each table's sharding, per-rank memory
(weights + sparse optimizer state) and the planner's estimated step cost; writes JSON.

``--compare`` plans every strategy of ``--shardings`` on every world size of ``--world-sizes``
and writes OUT (JSON), OUT with .md (a table) and .png (a plot) beside it.
"""

from __future__ import annotations

import argparse
import json

from cctl_rec.data.manifest import atomic_write_bytes
from cctl_rec.distributed.plan_report import COMPARE_SHARDINGS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="dry-run sharding plan (no GPU needed)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  cctl-rec plan --preset meituan --world-size 16 --device cuda --hbm-gb 80 "
                              "--sharding auto --out plan.json\n  cctl-rec plan --compare --preset meituan "
                              "--device cuda --hbm-gb 80 --out docs/plans/meituan-compare.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="datagen preset: tiny, small or meituan")
    src.add_argument("--data", help="a dataset root (its manifest's schema)")
    p.add_argument("--world-size", type=int, default=None, help="ranks (required without --compare)")
    p.add_argument("--compare", action="store_true", help="compare sharding strategies over several world sizes")
    p.add_argument("--world-sizes", default="8,16,64", help="with --compare: comma-separated world sizes")
    p.add_argument("--shardings", default=",".join(COMPARE_SHARDINGS), help="with --compare: comma-separated")
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
    from cctl_rec.datagen.pipeline import schemas_of
    from cctl_rec.datagen.presets import resolve

    return schemas_of(resolve(args.preset))


def run(args: argparse.Namespace) -> int:
    from cctl_rec.distributed.plan_report import plan_model

    if args.batch_size <= 0 or args.embedding_dim <= 0 or args.hbm_gb <= 0:
        raise ValueError("--batch-size, --embedding-dim and --hbm-gb must be > 0")
    if args.compare:
        return run_compare(args)
    if args.world_size is None:
        raise ValueError("--world-size is required (or use --compare)")
    if args.world_size <= 0:
        raise ValueError(f"--world-size must be > 0, got {args.world_size}")
    rep = plan_model(schemas_for(args), args.world_size, args.device, args.hbm_gb, args.ddr_gb, args.sharding,
                     args.batch_size, args.embedding_dim)
    print(rep["stats_table"])
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
    print(f"planner's estimated step cost: {rep['est_step_ms']:.2f} ms on the slowest rank (mean "
          f"{sum(rep['per_rank_est_ms']) / len(rep['per_rank_est_ms']):.2f} ms); planned in {rep['plan_seconds']:.1f}s")
    if args.out:
        atomic_write_bytes(args.out, (json.dumps({k: v for k, v in rep.items() if k != "plan_text"}, indent=2)
                                      + "\n").encode())
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated integers such as 8,16,64") from None
    if not out or min(out) <= 0:
        raise ValueError(f"{flag}={text!r}: expected positive integers such as 8,16,64")
    return out


def run_compare(args: argparse.Namespace) -> int:
    import os

    from cctl_rec.distributed.plan_report import compare, compare_markdown, compare_png

    sizes = _ints(args.world_sizes, "--world-sizes")
    shardings = tuple(x.strip() for x in args.shardings.split(",") if x.strip())
    if not args.out:
        raise ValueError("--compare needs --out FILE.json (the .md table and .png plot go beside it)")
    if not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out!r}: expected a path ending in .json")
    rows = compare(schemas_for(args), sizes, shardings, args.device, args.hbm_gb, args.ddr_gb, args.batch_size,
                   args.embedding_dim)
    what = args.preset or args.data
    md = (f"Sharding strategies for CCTL ({what}, {args.device}, {args.hbm_gb:g} GB per rank, batch "
          f"{args.batch_size} per rank, dim {args.embedding_dim}, rowwise Adagrad state):\n\n"
          + compare_markdown(rows, args.hbm_gb))
    print(md)
    stem = args.out[:-len(".json")]
    from iopath.common.file_io import g_pathmgr

    if os.path.dirname(args.out):
        g_pathmgr.mkdirs(os.path.dirname(args.out))
    compare_png(rows, stem + ".png", args.hbm_gb)
    atomic_write_bytes(stem + ".md", md.encode())
    atomic_write_bytes(args.out, (json.dumps({"preset": args.preset, "data": args.data, "device": args.device,
                                              "hbm_gb": args.hbm_gb, "batch_size": args.batch_size,
                                              "rows": rows}, indent=2) + "\n").encode())
    print(f"wrote {args.out}, {os.path.basename(stem)}.md and {os.path.basename(stem)}.png")
    return 0
