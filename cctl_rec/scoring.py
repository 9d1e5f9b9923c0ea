"""Scores one checkpoint of a run on any target split: the served network, unsharded, on one process.

The network is read out of the DCP checkpoint into a :class:`~cctl_rec.export.ServingModel` (what
``cctl-rec export`` would write from that checkpoint), so no process group, TorchRec sharding or the
training dataset is needed: the model's schema comes from the checkpoint's own fingerprint and
the scored dataset's target schema must equal it.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from iopath.common.file_io import g_pathmgr

from cctl_rec.config import TrainConfig, load_config
from cctl_rec.data.loader import Dataset
from cctl_rec.data.manifest import join
from cctl_rec.data.reader import GROUP_COLUMN, ParquetStream
from cctl_rec.metrics import BinaryMetrics, GroupMetrics, UserAUC
from cctl_rec.schema import DomainSchema
from cctl_rec.train.checkpoint import list_checkpoints, read_trainer_meta


def run_config(run_dir: str) -> TrainConfig:
    """The resolved config.yaml of a run directory (one line naming it when it is not one)."""
    path = join(run_dir, "config.yaml")
    if not g_pathmgr.isdir(run_dir):
        raise FileNotFoundError(f"--run-dir {run_dir} does not exist; expected a cctl-rec run directory")
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml; is it a cctl-rec run directory?")
    return load_config(path)


def pick_checkpoint(run_dir: str, which: str) -> tuple[int, str]:
    """(step, path) of ``which``: "latest", "best" (``run.keep_best``'s ``RUN/best/``) or a step
    number of a complete checkpoint in ``run_dir``."""
    if which == "best":
        from cctl_rec.train.best import read_best

        best = read_best(run_dir)
        if best is None:
            raise FileNotFoundError(f"--checkpoint best: {run_dir} has no best checkpoint; train with "
                                    f"run.keep_best=true and run.eval_every=N to keep one")
        return int(best["step"]), best["path"]
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint")
    if which == "latest":
        return ckpts[-1]
    if not which.isdigit():
        raise ValueError(f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}")
    by_step = dict(ckpts)
    if int(which) not in by_step:
        raise ValueError(f"--checkpoint {which}: {run_dir} has no complete checkpoint of step {int(which)}; "
                         f"it has steps {sorted(by_step)}")
    return int(which), by_step[int(which)]


def served_network(cfg: TrainConfig, ckpt: str) -> str:
    """The checkpoint's network that ``export`` serves: the DNN's pure one; the best checkpoint's
    measured one (``best.json``); CCTL's pure one in a checkpoint written after the run's last
    sync (``trainer.json`` ``final``), else its mixed one (what that sync copies into the pure
    network)."""
    from cctl_rec.train.best import BEST_JSON

    if cfg.model.name != "cctl":
        return "pure"
    if g_pathmgr.exists(join(ckpt, BEST_JSON)):
        with g_pathmgr.open(join(ckpt, BEST_JSON), "r", encoding="utf-8") as f:
            return json.loads(f.read())["network"]
    return "pure" if read_trainer_meta(ckpt).get("final") else "mixed"


def checkpoint_schema(ckpt: str) -> DomainSchema:
    """The target schema the checkpoint was trained on (its fingerprint's ``schema``)."""
    fp = read_trainer_meta(ckpt)["fingerprint"]
    try:
        return DomainSchema.from_json(json.loads(fp["schema"])["tgt"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {ckpt}: its trainer.json fingerprint has no target schema ({e})") from None


def score(run_dir: str, data_root: str, split: str, which: str = "latest", network: Optional[str] = None,
          batch_size: int = 8192) -> dict[str, Any]:
    """Metrics of one checkpoint's network on ``split`` of ``data_root``.

    Returns ``{"step", "network", "split", "rows", "auc", "logloss", "ne", "calibration", "ctr",
    "gauc", "gauc_users", "groups"}`` (groups: per user group when the split has ``user_group``).
    """
    from cctl_rec.export import load_network_from_checkpoint, serving_inputs

    cfg = run_config(run_dir)
    step, ckpt = pick_checkpoint(run_dir, which)
    network = network or served_network(cfg, ckpt)
    schema = checkpoint_schema(ckpt)
    data = Dataset(data_root)
    if not data.has_split(split):
        raise ValueError(f"--split {split}: dataset {data_root} has no such split; it has "
                         f"{sorted(k for k, v in data.manifest['splits'].items() if v)}")
    if not split.startswith("tgt/"):
        raise ValueError(f"--split {split}: the served network scores target rows; expected a tgt/* split")
    if data.schemas["tgt"].to_json() != schema.to_json():
        raise ValueError(f"dataset {data_root}'s target schema differs from the one checkpoint {ckpt} was trained "
                         f"on; expected a dataset with the same features and table sizes")
    model = load_network_from_checkpoint(ckpt, schema, cfg.model.embedding_dim, cfg.model.tower, network,
                                         cfg.model.head)
    meters, gauc = BinaryMetrics(split), UserAUC()
    groups = GroupMetrics() if data.has_column(split, GROUP_COLUMN) else None
    stream = ParquetStream(data.paths(split), schema, batch_size, drop_last=False)
    rows = 0
    with torch.no_grad():
        for r in stream:
            z = model(*serving_inputs(model, r.table, cfg.data.max_seq_len, r.path))
            y = torch.from_numpy(r.table.column("label").to_numpy(zero_copy_only=False).astype("float32"))
            meters.update(z, y)
            gauc.update(z, y, torch.from_numpy(r.table.column("user_id").to_numpy(zero_copy_only=False)))
            if groups is not None:
                g = r.table.column(GROUP_COLUMN).to_numpy(zero_copy_only=False).astype("int64")
                groups.update(z, y, torch.from_numpy(g))
            rows += len(r)
    return {"step": step, "network": network, "split": split, "rows": rows, **meters.compute(), **gauc.compute(),
            "groups": groups.compute() if groups is not None else None}
