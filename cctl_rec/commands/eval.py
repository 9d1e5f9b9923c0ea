"""``cctl-rec eval``: prints a table of target test AUC / logloss from one or more run directories
(local paths or URLs such as ``s3://bucket/runs/dnn``, docs/storage.md)."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Optional

from iopath.common.file_io import g_pathmgr
from pydantic import BaseModel, ConfigDict, Field

from cctl_rec.data.manifest import join
from cctl_rec.metrics import fmt
from cctl_rec.safe_io import read_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="result table of finished runs", description=__doc__)
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.json (local paths or URLs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.add_argument("--by-seed", action="store_true",
                   help="group the runs that differ only in their seed (a NAME-s<k> directory, or a seed<k> "
                        "path component as in an experiment's DATASET/MODEL/seed<k>) and report mean ± std "
                        "over seeds")
    p.set_defaults(func=run)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class SplitMetricsJSON(_Strict):
    auc: Optional[float]
    logloss: Optional[float]


class GroupJSON(_Strict):
    auc: Optional[float] = None


class SelectorJSON(_Strict):
    p_mean: Optional[float] = None
    p_clean: Optional[float] = None
    p_harmful: Optional[float] = None
    harmful_auc: Optional[float] = None


class MetricsJSON(_Strict):
    """metrics.json of a finished run: what the tables read is typed."""

    model: str = Field(max_length=200)
    steps: int = Field(ge=0)
    world_size: int = Field(ge=1)
    target_test: SplitMetricsJSON
    target_valid: SplitMetricsJSON
    train_samples_per_s: float
    selector: Optional[SelectorJSON] = None
    reward_mean: Optional[float] = None
    target_test_groups: Optional[dict[str, Optional[GroupJSON]]] = None


MAX_METRICS_BYTES = 256 << 20


def load_metrics(run_dir: str) -> dict:
    """A run's metrics.json (bounded read, validated: one line naming the file and key)."""
    path = join(run_dir, "metrics.json")
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a finished run directory?")
    return read_json(path, MetricsJSON, "cctl-rec metrics file", MAX_METRICS_BYTES)


GROUPS = ("cold", "warm")


def group_auc(m: dict, group: str, split: str = "target_test") -> Optional[float]:
    """A run's target AUC on one user group (``metrics.json``'s ``<split>_groups``), or None."""
    return ((m.get(f"{split}_groups") or {}).get(group) or {}).get("auc")


def _has_groups(ms: list[dict]) -> bool:
    return any(m.get("target_test_groups") for m in ms)


def table(rows: list[tuple[str, dict]]) -> str:
    groups = _has_groups([m for _, m in rows])
    gh = "".join(f" test AUC {g} |" for g in GROUPS) if groups else ""
    lines = [f"| run | model | steps | ranks | test AUC |{gh} test logloss | test NE | test GAUC | test calibration "
             "| valid AUC | p_mean | p_clean | p_harm | harmful AUROC | samples/s |",
             "|---|---|---|---|---|" + "---|" * (len(GROUPS) if groups else 0) + "---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        s, t = m.get("selector") or {}, m["target_test"]  # ne / gauc / calibration: n/a in older runs
        gc = "".join(f" {fmt(group_auc(m, g))} |" for g in GROUPS) if groups else ""
        lines.append(f"| {name} | {m['model']} | {m['steps']} | {m['world_size']} | {fmt(m['target_test']['auc'])} "
                     f"|{gc} {fmt(m['target_test']['logloss'])} | {fmt(t.get('ne'))} | {fmt(t.get('gauc'))} | "
                     f"{fmt(t.get('calibration'))} | {fmt(m['target_valid']['auc'])} | "
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


_SEED_DIR = re.compile(r"seed\d+")
_SEED_SUFFIX = re.compile(r"-s\d+$")


def _url_head(path: str) -> tuple[str, str]:
    """(``s3://``, ``bucket/runs/a``) for a URL; ("", path) for a local path."""
    head, sep, rest = path.partition("://")
    return (head + sep, rest) if sep else ("", path)


def seed_group(run_dir: str) -> str:
    """The run's path without its seed: a ``seed<k>`` component (an experiment's
    ``DATASET/MODEL/[alpha<a>/]seed<k>``) dropped and a ``-s<k>`` suffix stripped from every
    component, so runs that differ only in the seed share it."""
    head, run_dir = _url_head(run_dir)
    parts = os.path.normpath(run_dir).split(os.sep)
    return head + (os.sep.join(_SEED_SUFFIX.sub("", p) for p in parts if not _SEED_DIR.fullmatch(p)) or ".")


def _labels(paths: list[str]) -> list[str]:
    """Each path relative to the folder all of their parents share (``amazon/dnn/seed0``, ``dnn``);
    URLs of one scheme are labelled below the prefix they share."""
    heads = {_url_head(k)[0] for k in paths}
    if len(heads) == 1 and "" not in heads:  # URLs, one scheme: the same rule on what follows it
        head, rests = heads.pop(), [os.path.normpath(_url_head(k)[1]) for k in paths]
        return [lab if lab != r else head + r for lab, r in zip(_labels(rests), rests)]
    paths = [os.path.normpath(k) for k in paths]
    parents = [os.path.dirname(k) or "." for k in paths]
    try:
        common = os.path.commonpath(parents) if parents else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    return [os.path.relpath(k, common) if common else k for k in paths]


def grouped(rows: list[tuple[str, dict]]) -> str:
    """Mean ± std over seeds of the runs grouped by :func:`seed_group` (``rows``: run dir, metrics)."""
    groups: dict[str, list[dict]] = {}
    for run_dir, m in rows:
        groups.setdefault(seed_group(run_dir), []).append(m)
    labels = dict(zip(groups, _labels(list(groups))))
    with_groups = _has_groups([m for _, m in rows])
    gh = "".join(f" test AUC {g} |" for g in GROUPS) if with_groups else ""
    lines = [f"| runs | seeds | test AUC |{gh} test logloss | p_clean | p_harm | harmful AUROC | mean reward |",
             "|---|---|---|" + "---|" * (len(GROUPS) if with_groups else 0) + "---|---|---|---|---|"]
    for g, ms in groups.items():
        sel = [m.get("selector") or {} for m in ms]
        gc = "".join(f" {_stat([group_auc(m, x) for m in ms])} |" for x in GROUPS) if with_groups else ""
        lines.append(f"| {labels[g]} | {len(ms)} | {_stat([m['target_test']['auc'] for m in ms])} |{gc} "
                     f"{_stat([m['target_test']['logloss'] for m in ms])} | {_stat([s.get('p_clean') for s in sel])} | "
                     f"{_stat([s.get('p_harmful') for s in sel])} | {_stat([s.get('harmful_auc') for s in sel])} | "
                     f"{_stat([m.get('reward_mean') for m in ms])} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cctl_rec.storage import check_location

    for d in args.run_dirs:  # an unusable URL (scheme, bucket, credentials): one line before anything is read
        check_location(d, "run directory", remote_ok=True)
    if args.by_seed:
        print(grouped([(d, load_metrics(d)) for d in args.run_dirs]))
        return 0
    rows = [(name, load_metrics(d)) for name, d in zip(_labels(args.run_dirs), args.run_dirs)]
    if args.json:
        print(json.dumps({n: {k: v for k, v in m.items() if k != "history"} for n, m in rows}, indent=2))
    else:
        print(table(rows))
    return 0
