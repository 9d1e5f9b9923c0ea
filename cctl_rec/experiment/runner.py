"""Runs an experiment's models x datasets x seeds.

Each run is ``cctl-rec train`` writing to ``OUT/runs/<dataset>/<model>/seed<k>``: 1-rank runs go
to ``jobs`` worker processes pinned one per core, each running its runs one after another in
process (:mod:`cctl_rec.experiment.worker`: the imports are paid once per worker, not per run);
multi-rank runs are torchrun jobs, one at a time. A run whose ``metrics.json`` exists is not run
again, so an interrupted experiment continues where it stopped. A run that fails is recorded with
the line of its log that says why and the experiment goes on; the command exits nonzero at the end.

``OUT`` may be a URL (``s3://bucket/exp``, docs/storage.md): each run's directory is then a prefix
below it (``train --run-dir`` on a URL), "finished" means its ``metrics.json`` is in a fresh listing
of the prefix, and ``train.log`` (the worker's stdout and stderr, written by redirecting file
descriptors) is staged in ``CCTL_REC_CACHE/runs/<sha256 of the run's URL>/train.log`` and uploaded
when the run ends, failed or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from iopath.common.file_io import g_pathmgr

from cctl_rec import storage
from cctl_rec.data.manifest import join
from cctl_rec.experiment.spec import DataSpec, ExperimentSpec, ModelSpec, slug
from cctl_rec.safe_io import first_line

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
    runs = [Run(ds, m, s) for ds in spec.datasets for m in spec.models if m.runs_on(ds.name)
            for s in spec.seeds_of(ds, m)]
    if spec.alpha_sweep:
        name, values = spec.alpha_sweep
        model = next(m for m in spec.models if m.name == name)
        own = model_alpha(spec, model)  # the model's own runs already give this point
        runs += [Run(ds, model, s, a) for ds in spec.datasets if model.runs_on(ds.name) for a in values if a != own
                 for s in spec.seeds_of(ds, model)]
    return runs


def model_alpha(spec: ExperimentSpec, model: ModelSpec) -> float:
    """selector.alpha of ``model``'s runs (its config with the experiment's and its overrides)."""
    from cctl_rec.config import load_config

    return load_config(model.config, [*spec.overrides, *model.overrides]).selector.alpha


def run_dir_of(out: str, run: Run) -> str:
    """``OUT/runs/<key>`` (``/``-joined below a URL)."""
    return join(out, "runs", run.key)


def log_paths(run_dir: str) -> tuple[str, Optional[str]]:
    """(where the run's ``train.log`` is written, the URL it is uploaded to or None): the log
    itself for a local run directory; for a URL, a staged file in ``CCTL_REC_CACHE``."""
    if not storage.is_remote(run_dir):
        return os.path.join(run_dir, "train.log"), None
    staged = os.path.join(storage.cache_root(), "runs", hashlib.sha256(run_dir.encode()).hexdigest()[:32],
                          "train.log")
    return staged, join(run_dir, "train.log")


def _upload_log(log_path: str, remote: Optional[str]) -> None:
    """Uploads a staged train.log; a failed upload is a warning (the run's result stands)."""
    if remote is None:
        return
    try:
        storage.put_file(log_path, remote)
    except Exception as e:  # noqa: BLE001 - the log stays staged in CCTL_REC_CACHE
        logger.warning("could not upload %s to %s (%s: %s)", log_path, remote, type(e).__name__, first_line(e))


def _cli() -> list[str]:
    return [sys.executable, "-m", "cctl_rec.cli"]


def prepare_data(ds: DataSpec) -> None:
    """Creates ``ds`` with its ``prepare`` command when it has no manifest. A URL is checked as the
    CLI checks one (scheme, bucket, credentials: one ValueError) before it is looked at."""
    if storage.is_remote(ds.path):
        storage.check_location(ds.path, f"dataset {ds.name}: path", remote_ok=True)
    if storage.has_name(ds.path, "manifest.json"):
        return
    if not ds.prepare:
        raise FileNotFoundError(f"dataset {ds.name}: {ds.path} has no manifest.json and the experiment gives no "
                                f"prepare command for it")
    logger.info("preparing %s: cctl-rec %s", ds.name, " ".join(ds.prepare))
    r = subprocess.run(_cli() + list(ds.prepare), capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        from cctl_rec.cli import UserError

        raise UserError(f"dataset {ds.name}: `cctl-rec {' '.join(ds.prepare)}` failed: {tail[0]}")


def train_command(run: Run, spec: ExperimentSpec, run_dir: str, port: int) -> list[str]:
    """The ``cctl-rec train`` command line of ``run`` (under torchrun when ``spec.ranks`` > 1)."""
    args = ["train", "--config", run.model.config, "--data", run.dataset.path, "--run-dir", run_dir,
            *spec.overrides, *run.dataset.overrides, *run.model.overrides, f"run.seed={run.seed}"]
    if run.alpha is not None:
        args.append(f"selector.alpha={run.alpha}")
    if spec.ranks == 1:
        return _cli() + args
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(spec.ranks),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "-m", "cctl_rec.cli", *args]


def _in_process(cmd: list[str], log_path: str, remote_log: Optional[str] = None) -> tuple[int, Optional[str], float]:
    """Worker task: one 1-rank run through the CLI in the worker's process."""
    from cctl_rec.experiment.worker import run_cli

    t0 = time.perf_counter()
    rc, err = run_cli(cmd[len(_cli()):], log_path)
    _upload_log(log_path, remote_log)
    return rc, err, time.perf_counter() - t0


def _subprocess(cmd: list[str], log_path: str, remote_log: Optional[str] = None) -> tuple[int, Optional[str], float]:
    from cctl_rec.experiment.worker import error_line

    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    _upload_log(log_path, remote_log)
    return rc, error_line(log_path) if rc else None, time.perf_counter() - t0


def default_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


WALL_FILE = "wall_seconds.json"
"""Beside a run's metrics.json: the wall seconds its worker spent on it (kept across invocations, so
a benchmark finished over several resumed invocations still reports its total compute time)."""


def _record_wall(run_dir: str, seconds: float) -> None:
    from cctl_rec.data.manifest import atomic_write_bytes

    atomic_write_bytes(join(run_dir, WALL_FILE), json.dumps({"wall_seconds": seconds}).encode())


def _recorded_wall(run_dir: str) -> Optional[float]:
    try:
        with g_pathmgr.open(join(run_dir, WALL_FILE)) as f:
            return float(json.load(f)["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_done(out: str, key: str, result: tuple[int, Optional[str], float]) -> None:
    """A run's wall time beside its metrics.json as soon as it finishes (an invocation stopped later
    still leaves the time of every run it finished)."""
    run_dir = join(out, "runs", key)
    if result[0] == 0 and storage.has_name(run_dir, "metrics.json"):
        _record_wall(run_dir, result[2])


def finished(spec: ExperimentSpec, out: str) -> list[dict[str, Any]]:
    """The records of the runs that finished (``--report-only``): nothing is trained or prepared."""
    records = []
    for run in plan_runs(spec):
        run_dir = run_dir_of(out, run)
        if storage.has_name(run_dir, "metrics.json"):
            with g_pathmgr.open(join(run_dir, "metrics.json")) as f:
                m = json.load(f)
            rec = {"dataset": run.dataset.name, "model": run.model.name, "seed": run.seed,
                   "alpha": run.alpha, "run_dir": run_dir, "status": "ok",
                   "metrics": {k: v for k, v in m.items() if k != "history"}, "history": m.get("history", [])}
            wall = _recorded_wall(run_dir)
            if wall is not None:
                rec["wall_seconds"] = wall
            records.append(rec)
    return records


def run_all(spec: ExperimentSpec, out: str, port: int = 29730, jobs: int = 1) -> list[dict[str, Any]]:
    """Runs what is missing (1-rank runs on ``jobs`` pinned workers) and returns one record per
    run, in plan order (metrics, or the failure and the line of its log that says why)."""
    if jobs > 1 and len(spec.datasets) > 1:  # conversions are single-threaded: one per core
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as ex:
            list(ex.map(prepare_data, spec.datasets))
    else:
        for ds in spec.datasets:
            prepare_data(ds)
    runs = plan_runs(spec)
    todo: dict[int, tuple[list[str], str, Optional[str]]] = {}
    for i, run in enumerate(runs):
        run_dir = run_dir_of(out, run)
        if not storage.has_name(run_dir, "metrics.json"):
            log_path, remote_log = log_paths(run_dir)
            os.makedirs(os.path.dirname(log_path), exist_ok=True)  # the run dir, or the log's staging dir
            todo[i] = (train_command(run, spec, run_dir, port + i % 50), log_path, remote_log)
    done: dict[int, tuple[int, Optional[str], float]] = {}
    if todo and spec.ranks == 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        from cctl_rec.experiment.worker import pin

        cores = default_cores()
        n = max(1, min(jobs, len(todo)))
        logger.info("%d run(s) to do on %d worker(s) pinned to cores %s", len(todo), n, cores[:n])
        with cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=pin,
                                    initargs=(cores[:n] if len(cores) >= n else cores,)) as pool:
            futs = {pool.submit(_in_process, *todo[i]): i for i in todo}
            for k, f in enumerate(cf.as_completed(futs), 1):
                i = futs[f]
                try:
                    done[i] = f.result()
                except Exception as e:  # a worker died (killed, out of memory): the run failed
                    done[i] = (1, f"worker died: {type(e).__name__}: {e}"[:300], 0.0)
                _record_done(out, runs[i].key, done[i])
                logger.info("[%d/%d] %s%s", k, len(todo), runs[i].key,
                            f" failed: {done[i][1]}" if done[i][0] else f" ({done[i][2]:.1f}s)")
    else:
        for k, i in enumerate(todo, 1):
            logger.info("[%d/%d] %s", k, len(todo), runs[i].key)
            done[i] = _subprocess(*todo[i])
            _record_done(out, runs[i].key, done[i])
    records = []
    for i, run in enumerate(runs):
        run_dir = run_dir_of(out, run)
        rec: dict[str, Any] = {"dataset": run.dataset.name, "model": run.model.name, "seed": run.seed,
                               "alpha": run.alpha, "run_dir": run_dir}
        if i in done:
            rc, err, secs = done[i]
            rec["wall_seconds"] = secs
            if rc != 0 or not storage.has_name(run_dir, "metrics.json"):
                rec.update(status="failed", error=err or "(no metrics.json written)", command=" ".join(todo[i][0]))
                logger.error("%s failed: %s", run.key, rec["error"])
                records.append(rec)
                continue
        if "wall_seconds" not in rec and (wall := _recorded_wall(run_dir)) is not None:
            rec["wall_seconds"] = wall
        with g_pathmgr.open(join(run_dir, "metrics.json")) as f:
            m = json.load(f)
        rec.update(status="ok", metrics={k: v for k, v in m.items() if k != "history"}, history=m.get("history", []))
        records.append(rec)
    return records
