"""Scoring a trained model on a target split: the CTR metrics of ``cctl_rec.metrics`` per network."""

from __future__ import annotations

from typing import Any

import torch

from cctl_rec.config import TrainConfig
from cctl_rec.data.loader import Dataset, eval_batches
from cctl_rec.data.reader import GROUP_COLUMN
from cctl_rec.distributed.env import gather_cat
from cctl_rec.metrics import BinaryMetrics, GroupMetrics, UserAUC
from cctl_rec.models.cctl import CCTL


def user_ids(module: CCTL, kjt: Any) -> torch.Tensor:
    """B int64 target user ids of a target batch's KJT (one ``user_id`` per row)."""
    jt = kjt[module.schemas["tgt"].prefix + "user_id"]
    return jt.values()


@torch.no_grad()
def evaluate(module: CCTL, data: Dataset, split: str, cfg: TrainConfig, rank: int, world: int,
             networks: tuple[str, ...] = ("pure",), keep_logits: bool = False) -> dict[str, Any]:
    """Each network's metrics on a target split, reduced across ranks (a collective).

    Returns ``{network: {"auc", "logloss", "ne", "calibration", "ctr"} (+ "gauc", "gauc_users"
    for the first network), "groups": ...}``: under "groups" the first network's AUC / logloss
    per user group (``{"cold": {"auc", "logloss", "rows"}, "warm": ...}``, auc None for a group
    with one label class or no rows) when the split has ``user_group``, else None (and, with
    ``keep_logits``, the first network's logits of every rank in row order under "logits").
    """
    meters = {n: BinaryMetrics(split) for n in networks}
    gauc = UserAUC()
    groups = GroupMetrics() if data.has_column(split, GROUP_COLUMN) else None
    kept = []
    for b in eval_batches(data, split, cfg.data, rank, world, cfg.run.max_eval_rows, positions=module.positions):
        for n in networks:
            z = module.predict(b.tgt, n, b.tgt_dense)
            meters[n].update(z, b.tgt_label)
            if n == networks[0]:
                gauc.update(z, b.tgt_label, user_ids(module, b.tgt))
                if keep_logits:
                    kept.append(z)
                if groups is not None:
                    groups.update(z, b.tgt_label, b.tgt_group)
    out: dict[str, Any] = {n: m.compute() for n, m in meters.items()}
    out[networks[0]].update(gauc.compute())
    out["groups"] = groups.compute() if groups is not None else None
    if keep_logits:
        out["logits"] = gather_cat(torch.cat(kept) if kept else torch.zeros(0))
    return out
