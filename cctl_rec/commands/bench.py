"""``cctl-rec bench WHAT``: measured benchmarks, written as JSON (``--out``) and markdown beside it.

- ``datagen``: generator rows/s per worker (generation alone and with the Parquet write), bytes
  per row, peak RSS per worker, and the extrapolated time of the full ``meituan`` preset.
- ``train``: target samples/s and peak RSS of the DNN and of CCTL, fp32 and bf16; CCTL's step
  part by part and its cost over its SCN towers; 1 vs N threads; fp32 vs bf16 target AUC.
- ``sync``: one mixed -> pure sync vs the target table's size, and its share of training at k.
- ``reward``: the selector's REINFORCE bookkeeping per step and per update, as a share of a step.
- ``data``: Parquet -> KJT rows/s against what the trainer consumes.
- ``kernels``: fbgemm's fused TBE (rowwise Adagrad) vs nn.EmbeddingBag + a torch optimizer.
- ``scaling``: 1 vs 2 gloo ranks: per-step accounting and bytes per collective, counted.
- ``stress``: a long run through many syncs and selector updates: RSS flat, no NaN, the sync and
  REINFORCE invariants after every window, the reward 0 right after each sync (exit code 1 when one
  fails); ``--preset meituan --scale-ids F --stress-world 4``: the design card's run, on the
  Meituan preset's id spaces scaled by F, with the paper's k = 1000 and selector window 1000.
- ``all``: every benchmark above except datagen; ``--out`` is then a directory.

Timings on a shared machine are noisy: variants alternate within one process and results are
medians with min and max; the load average during the run is recorded. docs/benchmarks/ holds
the results for the development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from cctl_rec.data.manifest import atomic_write_bytes

NEW = ("train", "sync", "reward", "data", "kernels", "scaling", "stress")


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(float(x)) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return vals


HELP = {
    "train": "DNN vs CCTL samples/s and RSS, fp32 vs bf16, CCTL's step part by part, bf16 AUC",
    "sync": "one mixed -> pure sync vs target-table size; share of training at k",
    "reward": "REINFORCE bookkeeping per step and per update, share of a step",
    "data": "Parquet -> KJT rows/s vs the trainer's consumption",
    "kernels": "fused TBE (rowwise Adagrad) vs nn.EmbeddingBag + torch optimizers",
    "scaling": "1 vs 2 gloo ranks: per-step accounting and bytes per collective",
    "stress": "long run: RSS flat, no NaN, sync and REINFORCE invariants every window (exit 1 on failure)",
    "all": "every benchmark but datagen; --out is a directory",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: datagen, train, sync, reward, data, kernels, scaling, stress, all",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: cctl-rec bench train --data data/small --steps 40 --out "
                              "docs/benchmarks/train.json")
    whats = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    d = whats.add_parser("datagen", help="generator rows/s per worker, bytes per row, peak RSS",
                         description="Generator throughput and memory (datagen/bench.py).")
    d.add_argument("--preset", default="small", help="datagen preset whose id spaces are used")
    d.add_argument("--rows", type=int, default=2_000_000, help="rows per measurement")
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--cores", type=int, default=64, help="core count for the meituan extrapolation")
    d.add_argument("--out", default=None, help="write the JSON here")
    d.set_defaults(func=run)
    for what in (*NEW, "all"):
        mod_doc = HELP[what]
        g = whats.add_parser(what, help=mod_doc, description=mod_doc + ". " + (
            "Runs every benchmark but datagen." if what == "all" else f"See cctl_rec/bench/{what}.py."))
        g.add_argument("overrides", nargs="*", help="config overrides such as data.batch_size=256")
        g.add_argument("--out", default=None, help="write the JSON here and the markdown beside it (.md)"
                       + ("; a directory for `all`" if what == "all" else ""))
        g.add_argument("--data", default=None,
                       help="dataset root (cctl-rec datagen output; default data/small"
                            + ("; with --preset: where the data is generated, default data/PRESET-idsF)"
                               if what == "stress" else ")"))
        g.add_argument("--config", default="configs/cctl_small.yaml", help="training config to start from")
        g.add_argument("--steps", type=int, default=40, help="measured steps per variant and round")
        g.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
        g.add_argument("--repeats", type=int, default=3, help="rounds; variants alternate within a round")
        g.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default 1: on a shared machine more threads than free "
                            "cores slow every step down; 0 = torch's default)")
        g.add_argument("--seed", type=int, default=0)
        if what in ("train", "all"):
            g.add_argument("--auc-steps", type=int, default=0,
                           help="train: steps of the fp32 vs bf16 AUC runs (0: one full pass, -1: skip)")
            g.add_argument("--parts", default=None,
                           help="train: comma-separated subset of throughput,rss,breakdown,threads,auc")
        if what in ("sync", "kernels", "all"):
            g.add_argument("--table-rows", type=_ints, default=(1_000_000, 10_000_000, 50_000_000),
                           help="sync: target user-table sizes, comma-separated; kernels: the first is the "
                                "grown table")
        if what in ("scaling", "all"):
            g.add_argument("--world-sizes", type=_ints, default=(1, 2), help="scaling: gloo world sizes")
        if what in ("stress", "all"):
            g.add_argument("--stress-steps", type=int, default=None,
                           help="stress: the run's length in steps (default 1000; with --preset, 20 windows)")
            g.add_argument("--stress-warmup", type=int, default=0,
                           help="stress: steps before RSS must stay flat (0: a third of the run)")
            g.add_argument("--sync-every", type=int, default=0,
                           help="stress: k (0: stress steps / 25; with --preset, the paper's 1000)")
            g.add_argument("--update-every", type=int, default=0,
                           help="stress: selector window (0: stress steps / 25; with --preset, the paper's 1000)")
            g.add_argument("--rss-every", type=int, default=10, help="stress: steps between RSS samples")
            g.add_argument("--stress-world", type=int, default=1,
                           help="stress: gloo ranks (spawned, file:// rendezvous; every rank checks its own "
                                "shards and the REINFORCE update summed over ranks)")
        if what == "stress":
            g.add_argument("--preset", default=None,
                           help="stress: run on a datagen preset with its id spaces scaled by --scale-ids F "
                                "(`cctl-rec datagen --preset NAME --scale F --scale-ids`), generated into --data "
                                "or reused from there; k and the selector window default to the paper's 1000, "
                                "--stress-steps to 20 windows, and fewer than 20 syncs or selector updates are "
                                "refused (e.g. --preset meituan --scale-ids 0.01 --stress-world 4)")
            g.add_argument("--scale-ids", type=float, default=None,
                           help="stress: with --preset, F > 0: multiplies the preset's user / item id spaces and "
                                "its sample counts")
        g.set_defaults(func=run)


def _runner(what: str) -> Callable:
    import importlib

    return importlib.import_module(f"cctl_rec.bench.{what}").run


def command_line(args: argparse.Namespace, what: str) -> list[str]:
    """The full command (every option, defaults included) that reproduces a run of ``what``."""
    cmd = ["cctl-rec", "bench", what]
    for k, v in vars(args).items():
        if k in ("what", "overrides", "func", "command", "verbose", "out") or v is None:
            continue
        cmd += [f"--{k.replace('_', '-')}", ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)]
    if args.out:
        cmd += ["--out", os.path.join(args.out, f"{what}.json") if args.what == "all" else args.out]
    return cmd + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    if args.what == "datagen":
        return _datagen(args)
    from cctl_rec.bench import common
    from cctl_rec.bench.common import BenchOptions, md_path, write_results

    if args.config and not os.path.exists(args.config):
        raise FileNotFoundError(f"config file {args.config} does not exist")
    preset = getattr(args, "preset", None)
    if preset is not None or getattr(args, "scale_ids", None) is not None:
        from cctl_rec.bench.stress import preset_args

        preset_args(args)  # checked, and the defaults filled in, before anything is written
    if args.data is None:
        args.data = "data/small"
    if getattr(args, "stress_steps", 0) is None:
        args.stress_steps = 1000
    extra = {k: getattr(args, k) for k in ("auc_steps", "table_rows", "world_sizes", "stress_steps", "stress_warmup",
                                           "sync_every", "update_every", "rss_every", "stress_world", "preset",
                                           "scale_ids")
             if hasattr(args, k)}
    opts = BenchOptions(data=args.data, config=args.config, overrides=tuple(args.overrides), steps=args.steps,
                        warmup=args.warmup, repeats=args.repeats, threads=args.threads, seed=args.seed, **extra)
    if preset is not None:  # every option is checked (above) before the data is made
        from cctl_rec.bench.stress import preset_data

        preset_data(args.preset, args.scale_ids, args.data)
    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        raise FileNotFoundError(f"no dataset at {args.data} (manifest.json missing); generate one with "
                                f"`cctl-rec datagen --preset small --out {args.data}`")
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    whats = NEW if args.what == "all" else (args.what,)
    if args.what == "all" and args.out and os.path.splitext(args.out)[1]:
        raise ValueError(f"bench all --out takes a directory (one JSON + markdown per benchmark), got {args.out}")
    rc = 0
    for what in whats:
        kw = {}
        if what == "train" and getattr(args, "parts", None):
            kw["parts"] = tuple(x.strip() for x in args.parts.split(",") if x.strip())
        common.COMMAND = command_line(args, what)
        res, md = _runner(what)(opts, **kw)
        out = os.path.join(args.out, f"{what}.json") if args.what == "all" and args.out else args.out
        write_results(out, res, md)
        print(md)
        if out:
            print(f"wrote {out} and {md_path(out)}", file=sys.stderr)
        failed = [t["name"] for t in res.get("targets", []) if t.get("required") and t["met"] is False]
        if failed:
            print(f"cctl-rec bench {what}: failed: {', '.join(failed)}", file=sys.stderr)
            rc = 1
    return rc


def _datagen(args: argparse.Namespace) -> int:
    from cctl_rec.datagen.bench import bench_datagen
    from cctl_rec.datagen.presets import resolve

    resolve(args.preset)  # unknown preset: one clear line before any work
    res = bench_datagen(args.preset, args.rows, args.workers, args.cores)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0
