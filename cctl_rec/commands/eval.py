"""``cctl-rec eval``: prints a table of target test AUC / logloss from one or more run directories."""

from __future__ import annotations

import argparse
import json
import os

from iopath.common.file_io import g_pathmgr

from cctl_rec.metrics import fmt


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="result table of finished runs", description=__doc__)
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument("--by-seed", action="store_true",
                   help="group runs named NAME-s<seed> and report mean ± std over seeds")
    p.set_defaults(func=run)


def load_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.json")
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a finished run directory?")
    with g_pathmgr.open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg})") from None


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| run | model | steps | ranks | test AUC | test logloss | valid AUC | p_mean | p_clean | p_harm "
             "| harmful AUROC | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        s = m.get("selector") or {}
        lines.append(f"| {name} | {m['model']} | {m['steps']} | {m['world_size']} | {fmt(m['target_test']['auc'])} "
                     f"| {fmt(m['target_test']['logloss'])} | {fmt(m['target_valid']['auc'])} | "
                     f"{fmt(s.get('p_mean'), 3)} | {fmt(s.get('p_clean'), 3)} | {fmt(s.get('p_harmful'), 3)} | "
                     f"{fmt(s.get('harmful_auc'), 3)} | {m['train_samples_per_s']:.0f} |")
    return "\n".join(lines)


def _stat(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    mean = sum(xs) / len(xs)
    std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def grouped(rows: list[tuple[str, dict]]) -> str:
    import re

    groups: dict[str, list[dict]] = {}
    for name, m in rows:
        groups.setdefault(re.sub(r"-s\d+$", "", name), []).append(m)
    lines = ["| runs | seeds | test AUC | test logloss | p_clean | p_harm | harmful AUROC | mean reward |",
             "|---|---|---|---|---|---|---|---|"]
    for g, ms in groups.items():
        sel = [m.get("selector") or {} for m in ms]
        lines.append(f"| {g} | {len(ms)} | {_stat([m['target_test']['auc'] for m in ms])} | "
                     f"{_stat([m['target_test']['logloss'] for m in ms])} | {_stat([s.get('p_clean') for s in sel])} | "
                     f"{_stat([s.get('p_harmful') for s in sel])} | {_stat([s.get('harmful_auc') for s in sel])} | "
                     f"{_stat([m.get('reward_mean') for m in ms])} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = [(os.path.basename(os.path.normpath(d)), load_metrics(d)) for d in args.run_dirs]
    if args.by_seed:
        print(grouped(rows))
        return 0
    if args.json:
        print(json.dumps({n: {k: v for k, v in m.items() if k != "history"} for n, m in rows}, indent=2))
    else:
        print(table(rows))
    return 0
