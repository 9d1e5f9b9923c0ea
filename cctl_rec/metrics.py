"""Target CTR metrics reduced across ranks, and selector diagnostics.

AUC and logloss come from torchmetrics (``BinaryAUROC`` is exact under tied scores; torchrec
1.8's ``AUCMetric`` ranks ties in ``argsort`` order: four rows all scored 0.5 with labels
0, 1, 0, 1 give it 0.25, not 0.5). NE, calibration and CTR come from ``torchrec.metrics``
(``NEMetric``, ``CalibrationMetric``, ``CTRMetric``), GAUC from ``torchrec.metrics.gauc``'s
session AUC with one session per user (:class:`UserAUC`).
"""

from __future__ import annotations

import base64
import io
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchrec.metrics.calibration import CalibrationMetric
from torchrec.metrics.ctr import CTRMetric
from torchrec.metrics.gauc import get_auc_states
from torchrec.metrics.ne import NEMetric
from torchrec.metrics.rec_metric import RecMetric, RecTaskInfo

logger = logging.getLogger(__name__)


_TASK = RecTaskInfo(name="tgt", label_name="label", prediction_name="p", weight_name="w")
_WHOLE_SPLIT = 1 << 62
"""torchrec's window, in rows: larger than any split, so window and lifetime values agree."""


def _rec_metric(cls: type[RecMetric]) -> RecMetric:
    """A torchrec metric over the whole split whose ``compute()`` sums its states across ranks
    and answers on every rank."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return cls(world_size=dist.get_world_size() if on else 1, my_rank=dist.get_rank() if on else 0,
               batch_size=1, tasks=[_TASK], window_size=_WHOLE_SPLIT, compute_on_all_ranks=True)


class BinaryMetrics:
    """AUC, logloss, NE, calibration and CTR over batches; ``compute()`` syncs across ranks.

    Rows and positives are summed across ranks first: without rows every value is None, and with
    one label class ``auc``, ``ne`` (the label entropy is 0) and, without positives,
    ``calibration`` are None (undefined; a warning says so), never 0.0.

    NE = logloss / entropy of the split's CTR (< 1: better than predicting the CTR); calibration
    = sum of predicted probabilities / sum of labels (1: calibrated); CTR = mean label.

    Args:
        name: what the rows are (``tgt/test``), for the warning.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.auc = BinaryAUROC()
        self.logloss = MeanMetric()
        self.rec = {"ne": _rec_metric(NEMetric), "calibration": _rec_metric(CalibrationMetric),
                    "ctr": _rec_metric(CTRMetric)}
        self.counts = torch.zeros(2, dtype=torch.float64)  # rows, positives

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits``, ``labels``: B floats (labels 0/1)."""
        logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
        probs = torch.sigmoid(logits)
        self.auc.update(probs, labels.long())
        self.logloss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        for m in self.rec.values():
            m.update(predictions={"tgt": probs}, labels={"tgt": labels}, weights=None)
        self.counts[0] += labels.numel()
        self.counts[1] += float(labels.sum())

    def reset(self) -> None:
        """Forgets every row (the metric objects are kept: building them costs more than scoring a window)."""
        self.auc.reset()
        self.logloss.reset()
        for m in self.rec.values():
            m.reset()
        self.counts.zero_()

    def _rec_values(self, rows: int, pos: int) -> dict[str, Optional[float]]:
        """torchrec's lifetime values (a collective: every rank calls it); None where undefined."""
        got = {name: float(next(v for k, v in m.compute().items() if "|lifetime_" in k))
               for name, m in self.rec.items()}
        if not 0 < pos < rows:
            got["ne"] = None
        if pos == 0:
            got["calibration"] = None
        return got

    def state(self) -> Optional[str]:
        """This rank's open window (the rows since the last log line) as one base64 string, or None
        when it is empty: a checkpoint carries it so that a resume logs the line a kill cut with the
        same rows, i.e. the same history as an uninterrupted run."""
        if not self.logits:
            return None
        buf = io.BytesIO()
        torch.save((torch.cat(self.logits).cpu(), torch.cat(self.labels).cpu()), buf)
        return base64.b64encode(buf.getvalue()).decode()

    @classmethod
    def restore(cls, state: Optional[str]) -> "WindowMetrics":
        """The window :meth:`state` saved (an empty one for None)."""
        w = cls()
        if state:
            z, y = torch.load(io.BytesIO(base64.b64decode(state)), weights_only=True)
            w.logits, w.labels = [z], [y]
        return w

    def compute(self) -> dict[str, Optional[float]]:
        import torch.distributed as dist

        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        rows, pos = int(counts[0]), int(counts[1])
        if not rows:  # the same on every rank: all compute (a collective) or none
            logger.warning("no rows%s: AUC and logloss undefined, reported as null",
                           f" in {self.name}" * bool(self.name))
            return {"auc": None, "logloss": None, "ne": None, "calibration": None, "ctr": None}
        auc = float(self.auc.compute()) if 0 < pos < rows else None
        if auc is None:
            logger.warning("AUC%s is undefined: %d rows, all of label %d (one class); reported as null",
                           f" on {self.name}" * bool(self.name), rows, int(pos > 0))
        return {"auc": auc, "logloss": float(self.logloss.compute()), **self._rec_values(rows, pos)}


class UserAUC:
    """GAUC: the mean over users of each user's AUC (``torchrec.metrics.gauc``'s session AUC,
    one session per user, every user weighted 1), over the users with both labels whose scores
    are not all equal.

    Rows are gathered from every rank (a user's rows may sit on several), sorted by user and
    scored in chunks of whole users (at most ``chunk`` cells of the users x rows grid each).
    ``compute()`` is a collective: every rank calls it and gets the same value.
    """

    def __init__(self, chunk: int = 1 << 22) -> None:
        self.chunk = chunk
        self.users: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> None:
        """``logits``, ``labels``: B floats; ``users``: B int64 user ids."""
        if users.numel() != logits.numel():
            raise ValueError(f"GAUC needs one user id per row: {users.numel()} ids for {logits.numel()} rows")
        self.users.append(users.detach().cpu().long())
        self.probs.append(torch.sigmoid(logits.detach().float().cpu()))
        self.labels.append(labels.detach().cpu().float())

    def compute(self) -> dict[str, Optional[float]]:
        """``{"gauc": mean per-user AUC or None (no user has both labels), "gauc_users": users counted}``."""
        from cctl_rec.distributed.env import gather_cat

        cat = (lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt))  # noqa: E731
        users = gather_cat(cat(self.users, torch.long))
        probs, labels = gather_cat(cat(self.probs, torch.float)), gather_cat(cat(self.labels, torch.float))
        order = torch.argsort(users, stable=True)
        _, counts = torch.unique_consecutive(users[order], return_counts=True)
        by_len = torch.argsort(counts, stable=True)  # chunks of users with similar row counts
        starts = torch.cumsum(counts, 0) - counts
        auc_sum, n_users, i = 0.0, 0, 0
        while i < len(by_len):
            j = i + 1
            while j < len(by_len) and (j - i + 1) * int(counts[by_len[j]]) <= self.chunk:
                j += 1
            sel = by_len[i:j]
            rows = torch.cat([order[int(s):int(s) + int(c)] for s, c in zip(starts[sel], counts[sel])])
            st = get_auc_states(labels[rows][None], probs[rows][None], torch.ones(1, len(rows)),
                                counts[sel])
            auc_sum, n_users = auc_sum + float(st["auc_sum"][0]), n_users + int(st["num_samples"][0])
            i = j
        return {"gauc": auc_sum / n_users if n_users else None, "gauc_users": n_users}


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


class WindowMetrics:
    """Training CTR metrics over a window of steps (the steps between two log lines).

    :meth:`update` keeps each step's logits and labels where they are (no copy, no device sync);
    :meth:`compute` (a collective: every rank calls it at the same step) scores the window and
    starts the next one. Keys are prefixed ``train_``: ``train_auc``, ``train_logloss``,
    ``train_ne``, ``train_calibration``, ``train_ctr``.

    The states and formulas are torchrec's (``get_ne_states`` / ``compute_ne``,
    ``get_calibration_states``, ``get_ctr_states``), their sums reduced across ranks in one
    all-reduce; the AUC is torchmetrics' functional ``binary_auroc`` (exact under ties) over the
    window's rows of every rank. No metric object is built per window: a log line costs about
    1 ms for 5 steps of 512 rows (the :class:`BinaryMetrics` objects cost 5-10 ms).
    """

    ETA = 1e-12
    """torchrec's NE clamp of probabilities and label entropy."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits``, ``labels``: one step's B_t floats."""
        self.logits.append(logits.detach())
        self.labels.append(labels.detach())

    def state(self) -> Optional[str]:
        """This rank's open window (the rows since the last log line) as one base64 string, or None
        when it is empty: a checkpoint carries it so that a resume logs the line a kill cut with the
        same rows, i.e. the same history as an uninterrupted run."""
        if not self.logits:
            return None
        buf = io.BytesIO()
        torch.save((torch.cat(self.logits).cpu(), torch.cat(self.labels).cpu()), buf)
        return base64.b64encode(buf.getvalue()).decode()

    @classmethod
    def restore(cls, state: Optional[str]) -> "WindowMetrics":
        """The window :meth:`state` saved (an empty one for None)."""
        w = cls()
        if state:
            z, y = torch.load(io.BytesIO(base64.b64decode(state)), weights_only=True)
            w.logits, w.labels = [z], [y]
        return w

    def compute(self) -> dict[str, Optional[float]]:
        import torch.distributed as dist
        from torchmetrics.functional.classification import binary_auroc
        from torchrec.metrics.calibration import get_calibration_states
        from torchrec.metrics.ne import compute_ne, get_ne_states

        from cctl_rec.distributed.env import gather_cat

        z = torch.cat(self.logits).float().cpu() if self.logits else torch.zeros(0)
        y = torch.cat(self.labels).float().cpu() if self.labels else torch.zeros(0)
        self.logits, self.labels = [], []
        p = torch.sigmoid(z)
        w = torch.ones_like(p)
        ne = get_ne_states(y[None], p[None].clone(), w[None], self.ETA)
        cal = get_calibration_states(y[None], p[None], w[None])
        sums = torch.cat([ne["cross_entropy_sum"], ne["weighted_num_samples"], ne["pos_labels"], ne["neg_labels"],
                          cal["calibration_num"]]).double()  # 5 sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        ce, n, pos, neg, psum = sums.tolist()
        out: dict[str, Optional[float]] = {"train_auc": None, "train_logloss": None, "train_ne": None,
                                           "train_calibration": None, "train_ctr": None}
        if n == 0:  # the same on every rank
            return out
        pp, yy = gather_cat(p), gather_cat(y)
        two = 0 < pos < n
        out.update(train_auc=float(binary_auroc(pp, yy.long(), validate_args=False)) if two else None,
                   train_logloss=ce * math.log(2) / n,  # torchrec's cross entropy is in bits
                   train_ne=float(compute_ne(torch.tensor([ce]), torch.tensor([n]), torch.tensor([pos]),
                                             torch.tensor([neg]), self.ETA)) if two else None,
                   train_calibration=psum / pos if pos else None, train_ctr=pos / n)
        return out
