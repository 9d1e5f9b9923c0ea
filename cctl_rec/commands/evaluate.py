"""``cctl-rec evaluate``: scores one checkpoint of a run on any target split of any dataset with
the same target schema (AUC, logloss, NE, calibration, CTR, GAUC; per user group when the split
has ``user_group``). Prints one JSON object; ``--out`` also writes it (atomically).

By default the network ``cctl-rec export`` would serve from that checkpoint (CCTL: the mixed one,
which the final sync copies into the pure one; the DNN: the pure one); ``--network`` picks another.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint of a run on a split", description=__doc__)
    p.add_argument("--run-dir", required=True, help="a training run directory")
    p.add_argument("--data", required=True, help="dataset root (manifest.json) with the run's target schema")
    p.add_argument("--split", default="tgt/test", help="target split to score (default tgt/test)")
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (default), 'best' (run.keep_best) or a step number")
    p.add_argument("--network", choices=("pure", "mixed"), default=None,
                   help="network of the checkpoint to score (default: the one export serves)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cctl_rec.data.manifest import atomic_write_bytes
    from cctl_rec.scoring import score

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    out = {"run_dir": args.run_dir, "data": args.data,
           **score(args.run_dir, args.data, args.split, args.checkpoint, args.network, args.batch_size)}
    text = json.dumps(out)
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(out, indent=1) + "\n").encode())
    print(text)
    return 0
