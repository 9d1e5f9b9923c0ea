"""``cctl-rec train``: trains CCTL (or a baseline) on a dataset; runs as 1 process or under torchrun.

Before anything is written, every check that can fail the run is made (``preflight``): the
config, the dataset (manifest checksums, schemas, id ranges and labels from the Parquet footers,
rows for this many ranks), the device's sharding types and sparse optimizer, and the fingerprint
of the checkpoint a rerun would resume from. A mistake found later (e.g. tables the planner
cannot place) removes a run directory this command created, unless it holds a checkpoint.

With ``--features F``, ``--data`` is your own raw two-domain Parquet logs: rank 0 maps them with
the feature config (what ``cctl-rec prepare`` does) into RUN/prepared/<key>/ while the other ranks
wait, and training reads that; a rerun or a resumed run on the same config and files reuses it, a
changed config or changed files are mapped again (docs/features.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
from typing import Iterator

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train CCTL (or the target-only DNN)", description=__doc__,
                       epilog="example: cctl-rec train --config configs/cctl_tiny.yaml --data data/tiny "
                              "--run-dir runs/tiny selector.mode=bernoulli selector.ema_baseline=0.9")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--data", default=None, help="dataset root (overrides data.path)")
    p.add_argument("--run-dir", required=True, help="where config, plan, TensorBoard and metrics go")
    p.add_argument("--features", default=None,
                   help="feature config YAML: --data is then your raw Parquet logs, mapped into RUN/prepared/ "
                        "first (docs/features.md)")
    p.add_argument("--prepare-timeout", type=float, default=3600.0,
                   help="with --features: seconds ranks other than 0 wait for rank 0's mapping (default 3600)")
    p.add_argument("overrides", nargs="*", help="config overrides such as selector.alpha=0.5")
    p.set_defaults(func=run)


def env_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) for a plain process."""
    from cctl_rec.safe_io import short

    raw = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        rank, world = int(raw[0]), int(raw[1])
    except ValueError:
        rank = world = -1
    if not (1 <= world <= 1 << 20 and 0 <= rank < world):
        raise ValueError(f"RANK / WORLD_SIZE must be integers with 0 <= RANK < WORLD_SIZE, got RANK={short(raw[0])} "
                         f"WORLD_SIZE={short(raw[1])}")
    return rank, world


def preflight(cfg, run_dir: str) -> None:
    """Raises the first user mistake a training run of ``cfg`` into ``run_dir`` would hit."""
    from cctl_rec.data.loader import Dataset, check_dataset

    check_setup(cfg, run_dir)
    rank, world = env_world()
    data = Dataset(cfg.data.path)
    check_dataset(data, cfg, rank, world)
    check_run_dir(run_dir, cfg, data)


def check_setup(cfg, run_dir: str) -> None:
    """The checks of ``preflight`` that need no dataset (made before ``--features`` maps the raw logs)."""
    from cctl_rec.distributed.env import resolve_device
    from cctl_rec.distributed.sharding import sharding_types

    from iopath.common.file_io import g_pathmgr

    if not run_dir:
        raise ValueError("--run-dir must name a directory, got ''")
    if g_pathmgr.exists(run_dir) and not g_pathmgr.isdir(run_dir):
        raise NotADirectoryError(f"--run-dir {run_dir} exists and is not a directory")
    device, _ = resolve_device(cfg.dist.device, cfg.dist.backend)
    sharding_types(cfg.dist.sharding, device.type)
    if cfg.optim.sparse_optimizer == "adam" and device.type != "cuda":
        raise ValueError("optim.sparse_optimizer=adam is not supported by fbgemm's CPU TBE; "
                         "use exact_rowwise_adagrad (default) on CPU")


def check_run_dir(run_dir: str, cfg, data) -> None:
    """Raises ValueError when ``run_dir`` holds another run's checkpoint (another config, seed or
    dataset: a run directory belongs to one run, whether or not this run resumes) or a checkpoint
    this run would resume from and cannot read."""
    from cctl_rec.train.checkpoint import check_fingerprint, check_metadata, list_checkpoints, run_fingerprint

    ckpts = list_checkpoints(run_dir)
    if ckpts:
        check_fingerprint(ckpts[-1][1], run_fingerprint(cfg, data))
        if cfg.run.resume:
            check_metadata(ckpts[-1][1])


def _planner_error(e: Exception, cfg, world: int) -> ValueError:
    from cctl_rec.data.loader import Dataset

    feats = [(f.cardinality, s.prefix + f.name) for s in Dataset(cfg.data.path).schemas.values()
             for f in s.features]
    rows, name = max(feats)
    first = str(e).strip().splitlines()[0][:160]
    return ValueError(f"the embedding tables do not fit {world} rank(s) (dist.sharding={cfg.dist.sharding}): the "
                      f"largest, {name}, has {rows:,} rows x {cfg.model.embedding_dim}; planner: {first} "
                      f"(see `cctl-rec plan --data {cfg.data.path} --world-size N`)")


def run(args: argparse.Namespace) -> int:
    from torchrec.distributed.planner.types import PlannerError

    from cctl_rec.config import load_config
    from cctl_rec.logging_utils import detach_run_log, rank
    from cctl_rec.train.loop import train

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    made = False
    if getattr(args, "features", None):  # raw logs: mapped into RUN/prepared/<key>/ (rank 0), then read as a dataset
        from cctl_rec.data.features.cache import ensure_prepared

        if not args.data:
            raise ValueError("--features needs --data, the directory of the raw logs the config's files are "
                             "relative to")
        check_setup(load_config(args.config, overrides), args.run_dir)
        path, made = ensure_prepared(args.features, args.data, args.run_dir, env_world()[0], args.prepare_timeout)
        overrides = list(args.overrides) + [f"data.path={path}"]
    cfg = load_config(args.config, overrides)
    try:
        preflight(cfg, args.run_dir)
    except (ValueError, TypeError, FileNotFoundError):
        _remove_new_run_dir(args.run_dir, made)  # the mapping this command made goes with it
        raise
    with _writer_lock(args.run_dir, cfg, made) as created:
        try:
            m = train(cfg, args.run_dir)
        except PlannerError as e:
            detach_run_log(upload=False)
            _remove_new_run_dir(args.run_dir, created)
            raise _planner_error(e, cfg, env_world()[1]) from None
        except (ValueError, TypeError, FileNotFoundError):
            detach_run_log(upload=False)
            _remove_new_run_dir(args.run_dir, created)  # under the lock: no other run is writing there
            raise
        finally:  # the run's log (RUN/logs/rank<r>.log) closed; on a URL uploaded, failure or not
            detach_run_log()
    if rank() == 0:
        print(json.dumps({k: m[k] for k in ("model", "steps", "world_size", "target_test", "target_valid",
                                            "selector", "train_samples_per_s")}))
    return 0


@contextlib.contextmanager
def _writer_lock(run_dir: str, cfg, made: bool = False) -> Iterator[bool]:
    """Rank 0 makes the run directory and holds its lock for the run (a second ``train`` on it is
    refused at once), then checks the directory again under the lock: the run that held it may
    have written its checkpoint since ``preflight``. Yields whether this command created the
    directory (``made``: ``--features`` made it for the mapping). Other ranks write only inside
    rank 0's run."""
    from cctl_rec.data.loader import Dataset
    from cctl_rec.storage import is_remote, list_names
    from cctl_rec.train.rundir import prepare_run_dir, run_dir_lock

    if env_world()[0] != 0:
        yield False
        return
    if is_remote(run_dir):  # an object store has no lock (docs/storage.md): one writer is the launcher's to ensure
        created = made or not list_names(run_dir)
        prepare_run_dir(run_dir)
        yield created
        return
    created = made
    try:
        os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
        os.mkdir(run_dir)
        created = True
    except OSError:  # it exists (not ours), or prepare_run_dir says why it cannot be made
        pass
    prepare_run_dir(run_dir)
    with run_dir_lock(run_dir):
        try:
            check_run_dir(run_dir, cfg, Dataset(cfg.data.path))
        except (ValueError, TypeError, FileNotFoundError):
            _remove_new_run_dir(run_dir, created)
            raise
        yield created


def _remove_new_run_dir(run_dir: str, created: bool) -> None:
    """A user mistake found after the run directory was made: leave no half-made run behind
    (only a directory this command created and that holds no checkpoint yet; rank 0)."""
    from cctl_rec.logging_utils import rank
    from cctl_rec.storage import is_remote, remove_tree
    from cctl_rec.train.checkpoint import list_checkpoints

    if created and rank() == 0 and is_remote(run_dir) and not list_checkpoints(run_dir):
        remove_tree(run_dir)
        logger.info("removed %s, which this failed run had created", run_dir)
    elif created and rank() == 0 and os.path.isdir(run_dir) and not list_checkpoints(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("removed %s, which this failed run had created", run_dir)
