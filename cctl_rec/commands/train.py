"""``cctl-rec train``: trains CCTL (or a baseline) on a dataset; runs as 1 process or under torchrun."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train CCTL (or the target-only DNN)", description=__doc__,
                       epilog="example: cctl-rec train --config configs/cctl_tiny.yaml --data data/tiny "
                              "--run-dir runs/tiny selector.mode=bernoulli selector.ema_baseline=0.9")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", default=None, help="dataset root (overrides data.path)")
    p.add_argument("--run-dir", required=True, help="where config, plan, TensorBoard and metrics go")
    p.add_argument("overrides", nargs="*", help="config overrides such as selector.alpha=0.5")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cctl_rec.config import load_config
    from cctl_rec.train.loop import train

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    m = train(cfg, args.run_dir)
    from cctl_rec.logging_utils import rank

    if rank() == 0:
        print(json.dumps({k: m[k] for k in ("model", "steps", "world_size", "target_test", "target_valid",
                                            "selector", "train_samples_per_s")}))
    return 0
