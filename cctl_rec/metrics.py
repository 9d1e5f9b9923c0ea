"""Target AUC / logloss, reduced across ranks (torchmetrics), and selector diagnostics."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

logger = logging.getLogger(__name__)


class BinaryMetrics:
    """AUC and logloss over batches; ``compute()`` syncs across ranks.

    Rows and positives are summed across ranks first: without rows ``auc`` and ``logloss`` are
    None, and with one label class ``auc`` is None (undefined; a warning says so), never 0.0.

    Args:
        name: what the rows are (``tgt/test``), for the warning.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.auc = BinaryAUROC()
        self.logloss = MeanMetric()
        self.counts = torch.zeros(2, dtype=torch.float64)  # rows, positives

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().cpu()
        self.auc.update(torch.sigmoid(logits), labels.long())
        self.logloss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        self.counts[0] += labels.numel()
        self.counts[1] += float(labels.sum())

    def compute(self) -> dict[str, Optional[float]]:
        import torch.distributed as dist

        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        rows, pos = int(counts[0]), int(counts[1])
        if not rows:  # the same on every rank: all compute (a collective) or none
            logger.warning("no rows%s: AUC and logloss undefined, reported as null",
                           f" in {self.name}" * bool(self.name))
            return {"auc": None, "logloss": None}
        auc = float(self.auc.compute()) if 0 < pos < rows else None
        if auc is None:
            logger.warning("AUC%s is undefined: %d rows, all of label %d (one class); reported as null",
                           f" on {self.name}" * bool(self.name), rows, int(pos > 0))
        return {"auc": auc, "logloss": float(self.logloss.compute())}


GROUP_NAMES = ("warm", "cold")
"""``user_group`` code -> name (the converters' column on target valid/test rows)."""


class GroupMetrics:
    """AUC and logloss per user group (``GROUP_NAMES``), beside the overall :class:`BinaryMetrics`.

    Every rank must call :meth:`update` for every batch (an empty group is fine) and
    :meth:`compute` together: rows and positives are summed across ranks first, and a group
    without rows, or with one label class, reports ``auc`` None (and, without rows, ``logloss``
    None) instead of calling the metric, never 0.0.
    """

    def __init__(self) -> None:
        self.meters = [BinaryMetrics() for _ in GROUP_NAMES]
        self.counts = torch.zeros(len(GROUP_NAMES), 2, dtype=torch.float64)  # rows, positives

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        logits, labels, groups = logits.detach().cpu(), labels.detach().cpu(), groups.detach().cpu()
        for code, m in enumerate(self.meters):
            sel = groups == code
            m.update(logits[sel], labels[sel])
            self.counts[code, 0] += float(sel.sum())
            self.counts[code, 1] += float(labels[sel].sum())

    def compute(self) -> dict[str, dict[str, Optional[float]]]:
        import torch.distributed as dist

        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        out: dict[str, dict[str, Optional[float]]] = {}
        for code, (name, m) in enumerate(zip(GROUP_NAMES, self.meters)):
            rows, pos = int(counts[code, 0]), int(counts[code, 1])
            auc = logloss = None
            if rows:  # the same on every rank: all compute (a collective) or none
                logloss = float(m.logloss.compute())
                if 0 < pos < rows:
                    auc = float(m.auc.compute())
            out[name] = {"auc": auc, "logloss": logloss, "rows": rows}
        return out


def harmful_auc(p: torch.Tensor, harmful: torch.Tensor) -> Optional[float]:
    """AUROC of (1 - p) separating harmful from clean source samples; None without both classes."""
    h = harmful.long()
    if h.numel() == 0 or h.min() == h.max():
        return None
    m = BinaryAUROC()
    m.update(1.0 - p.float(), h)
    return float(m.compute())


def selector_stats(p: torch.Tensor, harmful: Optional[torch.Tensor], has_truth: bool) -> dict:
    """p mean/std, mean p on clean vs harmful rows, and harmful AUROC (null without ground truth)."""
    out: dict = {"p_mean": float(p.mean()), "p_std": float(p.std()) if p.numel() > 1 else 0.0,
                 "harmful_auc": None, "p_clean": None, "p_harmful": None, "rows": int(p.numel())}
    if has_truth and harmful is not None:
        out["harmful_auc"] = harmful_auc(p, harmful)
        if (~harmful).any():
            out["p_clean"] = float(p[~harmful].mean())
        if harmful.any():
            out["p_harmful"] = float(p[harmful].mean())
    return out


def fmt(x: Optional[float], nd: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"
