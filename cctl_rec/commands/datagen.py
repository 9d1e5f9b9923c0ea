"""``cctl-rec datagen``: writes the synthetic two-domain dataset (Parquet shards + manifest.json).

The source domain has a known harmful share (``is_harmful``), so selectors can be scored against
the truth. Output is byte-identical for any ``--workers`` and any number of replicas (env
``RANK`` / ``WORLD_SIZE``); a rerun into the same ``--out`` skips verified shards.

Example::

    cctl-rec datagen --preset tiny --out data/tiny --workers 2
    cctl-rec datagen --preset meituan --max-shards 2 --out data/meituan-try
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datagen", help="generate the synthetic two-domain dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny | small | meituan (default: tiny)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies sample counts (> 0)")
    p.add_argument("--scale-ids", action="store_true",
                   help="also multiply the user / item id spaces by --scale")
    p.add_argument("--out", required=True, help="output directory (local path or iopath URI)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (>= 1)")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="change a generator knob of the preset, e.g. --set harmful_frac=0.6 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--max-shards", type=int, default=None,
                   help="write at most N shards per split (try a big preset partially)")
    p.add_argument("--wait-timeout", type=float, default=6 * 3600.0,
                   help="with WORLD_SIZE > 1: seconds rank 0 waits for the other ranks")
    p.set_defaults(func=run)


def check_split_rows(preset: str, scale: float, scale_ids: bool, knobs: dict) -> None:
    """Raises ValueError when ``--scale`` leaves a split without rows (the dataset would be written,
    and ``train`` would then refuse it for lacking a split its manifest lists)."""
    from cctl_rec.datagen.presets import resolve

    params = resolve(preset, scale, scale_ids, 0, knobs)
    for dom in ("tgt", "src"):
        rows = getattr(params, dom).split_rows
        empty = [f"{dom}/{split}" for split, n in rows.items() if n < 1]
        if empty:
            total = getattr(params, dom).samples
            raise ValueError(f"--scale {scale:g} gives the {preset} preset {total} {dom} row(s), leaving "
                             f"{', '.join(empty)} with 0 rows ({', '.join(f'{dom}/{k} {v}' for k, v in rows.items())}); expected a larger "
                             f"--scale (every split needs rows)")


def run(args: argparse.Namespace) -> int:
    from cctl_rec.datagen.presets import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; expected one of {', '.join(PRESETS)}")
    if not args.scale > 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.max_shards is not None and args.max_shards < 1:
        raise ValueError(f"--max-shards must be >= 1, got {args.max_shards}")

    from cctl_rec.safe_io import DISK_ERRNOS
    from cctl_rec.datagen.pipeline import generate

    knobs = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        try:
            knobs[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq:
            raise ValueError(f"--set {item!r}: expected KNOB=NUMBER, e.g. harmful_frac=0.6")

    check_split_rows(args.preset, args.scale, args.scale_ids, knobs)
    try:
        manifest = generate(args.out, preset=args.preset, scale=args.scale, scale_ids=args.scale_ids,
                            seed=args.seed, workers=args.workers, max_shards=args.max_shards,
                            wait_timeout_s=args.wait_timeout, knobs=knobs)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise OSError(e.errno, f"{e.strerror or e} while writing the dataset into {args.out}; complete shards "
                      f"are kept and the manifest is not updated; a rerun resumes") from None
    if manifest is not None:
        st = manifest["stats"]
        rows = ", ".join(f"{k} {v}" for k, v in st["rows"].items())
        print(f"wrote {args.out}: {rows} rows; ctr tgt {st['tgt']['ctr']:.4f} "
              f"src {st['src']['ctr']:.4f}; harmful share {st['src']['harmful_share']:.3f}; "
              f"overlap users {st['user_overlap']:.4f} items {st['item_overlap']:.4f}")
    return 0
