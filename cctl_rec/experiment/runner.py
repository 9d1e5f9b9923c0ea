"""Runs an experiment's models x datasets x seeds, one training process (or torchrun job) at a time.

Each run is ``cctl-rec train`` in its own process (a fresh process group per run), writing to
``OUT/runs/<dataset>/<model>/seed<k>``; a run whose ``metrics.json`` exists is not run again, so an
interrupted experiment continues where it stopped. A run that fails is recorded with the tail of
its log and the experiment goes on; the command exits nonzero at the end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from cctl_rec.experiment.spec import DataSpec, ExperimentSpec, ModelSpec, slug

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    dataset: DataSpec
    model: ModelSpec
    seed: int
    alpha: Optional[float] = None  # set for the alpha sweep's runs

    @property
    def key(self) -> str:
        a = "" if self.alpha is None else f"alpha{self.alpha:g}/"
        return f"{slug(self.dataset.name)}/{slug(self.model.name)}/{a}seed{self.seed}"


def plan_runs(spec: ExperimentSpec) -> list[Run]:
    """Every run, seeds innermost; the alpha sweep after the models."""
    runs = [Run(ds, m, s) for ds in spec.datasets for m in spec.models for s in spec.seeds]
    if spec.alpha_sweep:
        name, values = spec.alpha_sweep
        model = next(m for m in spec.models if m.name == name)
        own = model_alpha(spec, model)  # the model's own runs already give this point
        runs += [Run(ds, model, s, a) for ds in spec.datasets for a in values if a != own for s in spec.seeds]
    return runs


def model_alpha(spec: ExperimentSpec, model: ModelSpec) -> float:
    """selector.alpha of ``model``'s runs (its config with the experiment's and its overrides)."""
    from cctl_rec.config import load_config

    return load_config(model.config, [*spec.overrides, *model.overrides]).selector.alpha


def _cli() -> list[str]:
    return [sys.executable, "-m", "cctl_rec.cli"]


def prepare_data(ds: DataSpec) -> None:
    """Creates ``ds`` with its ``prepare`` command when it has no manifest."""
    if os.path.exists(os.path.join(ds.path, "manifest.json")):
        return
    if not ds.prepare:
        raise FileNotFoundError(f"dataset {ds.name}: {ds.path} has no manifest.json and the experiment gives no "
                                f"prepare command for it")
    logger.info("preparing %s: cctl-rec %s", ds.name, " ".join(ds.prepare))
    r = subprocess.run(_cli() + list(ds.prepare), capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"dataset {ds.name}: `cctl-rec {' '.join(ds.prepare)}` failed: {tail[0]}")


def train_command(run: Run, spec: ExperimentSpec, run_dir: str, port: int) -> list[str]:
    """The ``cctl-rec train`` command line of ``run`` (under torchrun when ``spec.ranks`` > 1)."""
    args = ["train", "--config", run.model.config, "--data", run.dataset.path, "--run-dir", run_dir,
            *spec.overrides, *run.model.overrides, f"run.seed={run.seed}"]
    if run.alpha is not None:
        args.append(f"selector.alpha={run.alpha}")
    if spec.ranks == 1:
        return _cli() + args
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(spec.ranks),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "-m", "cctl_rec.cli", *args]


def run_all(spec: ExperimentSpec, out: str, port: int = 29730) -> list[dict[str, Any]]:
    """Runs what is missing and returns one record per run (metrics or the failure)."""
    for ds in spec.datasets:
        prepare_data(ds)
    records = []
    runs = plan_runs(spec)
    for i, run in enumerate(runs):
        run_dir = os.path.join(out, "runs", run.key)
        metrics_path = os.path.join(run_dir, "metrics.json")
        rec: dict[str, Any] = {"dataset": run.dataset.name, "model": run.model.name, "seed": run.seed,
                               "alpha": run.alpha, "run_dir": run_dir}
        if not os.path.exists(metrics_path):
            os.makedirs(run_dir, exist_ok=True)
            cmd = train_command(run, spec, run_dir, port + i % 50)
            logger.info("[%d/%d] %s", i + 1, len(runs), run.key)
            t0 = time.perf_counter()
            with open(os.path.join(run_dir, "train.log"), "w") as log:
                r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            rec["wall_seconds"] = time.perf_counter() - t0
            if r.returncode != 0 or not os.path.exists(metrics_path):
                with open(os.path.join(run_dir, "train.log")) as f:
                    tail = [ln for ln in f.read().splitlines() if ln.strip()][-1:] or ["(no output)"]
                rec.update(status="failed", error=tail[0][:300], command=" ".join(cmd))
                logger.error("%s failed: %s", run.key, rec["error"])
                records.append(rec)
                continue
        with open(metrics_path) as f:
            m = json.load(f)
        rec.update(status="ok", metrics={k: v for k, v in m.items() if k != "history"}, history=m.get("history", []))
        records.append(rec)
    return records
