"""Target CTR metrics through ``torchrec.metrics``' ``RecMetricModule``, and selector diagnostics.

:func:`ctr_metric_module` builds the one metric set every CTR number of a run goes through: a
``RecMetricModule`` (``torchrec.metrics.metric_module.generate_metric_module``) whose
``RecMetricList`` holds torchrec's ``NEMetric`` (with its logloss), ``CalibrationMetric``,
``CTRMetric``, ``SumWeightsMetric`` (rows) and ``NumPositiveSamplesMetric`` (positives), plus
:class:`ExactAUCMetric`. ``update()`` adds one batch to this rank's states and runs no collective;
``compute()`` gathers every state across ranks (torchmetrics' sync: a barrier and two all_gathers
per state, 69 collectives for the 23 states, counted on 2 ranks by ``tests/test_metrics.py``) and
answers on every rank. So it is called only when a number is read: at each log line (every
``run.log_every`` steps) and at the end of an evaluation.

- Evaluation (:class:`BinaryMetrics`): one module over the whole split, torchrec's lifetime values
  (its window states keep at most the last 1,000 batches: ``MAX_BUFFER_COUNT``).
- Training (:class:`WindowMetrics`): the pure tower's rows of the steps since the previous log
  line. The module is computed at the log line, then reset. torchrec's own sliding window
  (``window_size`` rows) is not used as the log window: its sums subtract the oldest batch as a new
  one comes, so their rounding depends on every batch since the run started, and a resumed run
  would log the same numbers as an uninterrupted one only if the checkpoint carried every batch's
  states (and the AUC's rows from before the previous log line, which the last, shorter window
  reads). Reset at each line, the window's states are sums over its own steps, rebuilt bitwise by
  replaying its rows (:meth:`WindowMetrics.state`).
- AUC: :class:`ExactAUCMetric` keeps torchrec's AUC states (the window's predictions, labels and
  weights, which torchrec gathers across ranks) and scores them with torchmetrics'
  ``binary_auroc``, exact under tied scores: torchrec 1.8's ``AUCMetric`` ranks ties in
  ``argsort`` order (four rows all scored 0.5 with labels 0, 1, 0, 1 give it 0.25, not 0.5).
- GAUC (:class:`UserAUC`): torchrec's ``GAUCMetric`` scores the sessions inside one ``update()``;
  a user's rows are spread over batches and ranks, so they are gathered and grouped by user first,
  then scored with ``torchrec.metrics.gauc.get_auc_states``.
- Logloss at evaluation is torchmetrics' ``MeanMetric`` of the BCE (float32: the value every
  published result carries); the training window's is torchrec's (double, converted from bits).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC
from torchrec.metrics.auc import AUCMetric, AUCMetricComputation
from torchrec.metrics.gauc import get_auc_states
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum
from torchrec.metrics.metrics_namespace import MetricName, MetricPrefix
from torchrec.metrics.rec_metric import MetricComputationReport, RecTaskInfo

logger = logging.getLogger(__name__)


_TASK = RecTaskInfo(name="tgt", label_name="label", prediction_name="p", weight_name="w")
_WHOLE_SPLIT = 1 << 62
"""torchrec's window, in rows: larger than any split or log window (nothing slides out)."""


class _ExactAUCComputation(AUCMetricComputation):
    """torchrec's AUC states, scored exactly under ties (torchmetrics' ``binary_auroc``); 0.5 (torchrec's
    no-signal value) without both label classes. Rows of weight 0 (the empty state's placeholder) are left out."""

    def _compute(self) -> list[MetricComputationReport]:
        from torchmetrics.functional.classification import binary_auroc

        p, y, w = (torch.cat(getattr(self, k), dim=-1)[0] for k in ("predictions", "labels", "weights"))
        p, y = p[w > 0], y[w > 0]
        pos = float(y.sum())
        auc = binary_auroc(p, y.long(), validate_args=False) if 0 < pos < y.numel() else torch.tensor(0.5)
        return [MetricComputationReport(name=MetricName.AUC, metric_prefix=MetricPrefix.WINDOW,
                                        value=auc.reshape(1).to(p.device))]


class ExactAUCMetric(AUCMetric):
    """torchrec's ``AUCMetric`` (key ``auc-<task>|window_auc``) with ties scored exactly (see the module docstring)."""

    _computation_class = _ExactAUCComputation


def ctr_metric_module(batch_size: int = 1, window_rows: int = _WHOLE_SPLIT) -> RecMetricModule:
    """The CTR metric set of one task (``p``, ``label``, ``w``) on this rank's collective device.

    Args:
        batch_size: rows per ``update()`` (torchrec checks that its window holds one batch).
        window_rows: torchrec's window over all ranks, in rows.

    Example::

        m = ctr_metric_module()
        m.update({"p": probs, "label": labels, "w": torch.ones_like(probs)})   # every batch
        values = m.compute()   # {"ne-tgt|lifetime_ne": ..., "auc-tgt|window_auc": ...}; a collective
    """
    import torch.distributed as dist

    from cctl_rec.distributed.env import collective_device

    on = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if on else (1, 0)
    defs = {e: RecMetricDef(rec_tasks=[_TASK], window_size=window_rows, arguments=args) for e, args in (
        (RecMetricEnum.NE, {"include_logloss": True}), (RecMetricEnum.CALIBRATION, None), (RecMetricEnum.CTR, None),
        (RecMetricEnum.SUM_WEIGHTS, None), (RecMetricEnum.NUM_POSITIVE_SAMPLES, None))}
    config = MetricsConfig(rec_tasks=[_TASK], rec_metrics=defs, compute_on_all_ranks=True)
    device = collective_device()
    module = generate_metric_module(RecMetricModule, config, batch_size, world, rank, {}, device)
    module.rec_metrics.rec_metrics.append(ExactAUCMetric(
        world_size=world, my_rank=rank, batch_size=batch_size, tasks=[_TASK], window_size=window_rows,
        compute_on_all_ranks=True).to(device))
    return module


def _update(module: RecMetricModule, probs: torch.Tensor, labels: torch.Tensor) -> None:
    """One batch of B probabilities and B 0/1 labels into ``module`` (moved to its device)."""
    from cctl_rec.distributed.env import collective_device

    dev = collective_device()
    p, y = probs.to(dev), labels.to(dev)
    module.update({"p": p, "label": y, "w": torch.ones_like(p)})


def _read(module: RecMetricModule) -> dict[str, float]:
    """``module.compute()`` (a collective) as ``{"rows", "pos", "ne", "logloss" (nats), "calibration",
    "ctr", "auc"}`` floats, before the undefined cases are set to None."""
    with warnings.catch_warnings():  # a rank without rows: torchmetrics warns "compute before update"
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        got = module.compute()
    t = _TASK.name
    return {"rows": float(got[f"sum_weights-{t}|lifetime_sum_weights"]),
            "pos": float(got[f"num_positive_samples-{t}|lifetime_num_positive_samples"]),
            "ne": float(got[f"ne-{t}|lifetime_ne"]), "logloss": float(got[f"ne-{t}|lifetime_logloss"]) * math.log(2),
            "calibration": float(got[f"calibration-{t}|lifetime_calibration"]),
            "ctr": float(got[f"ctr-{t}|lifetime_ctr"]), "auc": float(got[f"auc-{t}|window_auc"])}


def _defined(v: dict[str, float]) -> dict[str, Optional[float]]:
    """``{"auc", "ne", "calibration", "ctr"}`` of :func:`_read`'s values, None where undefined: every
    value without rows, AUC and NE (the label entropy is 0) with one label class, calibration
    without positives."""
    rows, pos = v["rows"], v["pos"]
    if not rows:
        return {"auc": None, "ne": None, "calibration": None, "ctr": None}
    two = 0 < pos < rows
    return {"auc": v["auc"] if two else None, "ne": v["ne"] if two else None,
            "calibration": v["calibration"] if pos else None, "ctr": v["ctr"]}


class BinaryMetrics:
    """AUC, logloss, NE, calibration and CTR over batches; ``compute()`` syncs across ranks.

    Rows and positives are summed across ranks first: without rows every value is None, and with
    one label class ``auc``, ``ne`` (the label entropy is 0) and, without positives,
    ``calibration`` are None (undefined; a warning says so), never 0.0.

    NE = logloss / entropy of the split's CTR (< 1: better than predicting the CTR); calibration
    = sum of predicted probabilities / sum of labels (1: calibrated); CTR = mean label.

    Args:
        name: what the rows are (``tgt/test``), for the warning.
        warn: warn where a value is undefined.
    """

    def __init__(self, name: str = "", warn: bool = True) -> None:
        self.name, self.warn = name, warn
        self.module = ctr_metric_module()
        self.logloss = MeanMetric()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits``, ``labels``: B floats (labels 0/1)."""
        logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
        _update(self.module, torch.sigmoid(logits), labels)
        self.logloss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))

    def reset(self) -> None:
        """Forgets every row (the metric objects are kept: building them costs more than scoring a window)."""
        self.module.reset()
        self.logloss.reset()

    def compute_with_rows(self) -> tuple[dict[str, Optional[float]], int]:
        """(:meth:`compute`'s values, rows over every rank)."""
        v = _read(self.module)
        rows, pos = int(v["rows"]), int(v["pos"])
        out = _defined(v)
        if not rows:  # the same on every rank: all compute the logloss (a collective) or none
            if self.warn:
                logger.warning("no rows%s: AUC and logloss undefined, reported as null",
                               f" in {self.name}" * bool(self.name))
            return {"auc": None, "logloss": None, **{k: out[k] for k in ("ne", "calibration", "ctr")}}, 0
        if out["auc"] is None and self.warn:
            logger.warning("AUC%s is undefined: %d rows, all of label %d (one class); reported as null",
                           f" on {self.name}" * bool(self.name), rows, int(pos > 0))
        return {"auc": out["auc"], "logloss": float(self.logloss.compute()), "ne": out["ne"],
                "calibration": out["calibration"], "ctr": out["ctr"]}, rows

    def compute(self) -> dict[str, Optional[float]]:
        """``{"auc", "logloss", "ne", "calibration", "ctr"}`` over every rank's rows (a collective)."""
        return self.compute_with_rows()[0]


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
    None), never 0.0.
    """

    def __init__(self) -> None:
        self.meters = [BinaryMetrics(warn=False) for _ in GROUP_NAMES]

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        logits, labels, groups = logits.detach().cpu(), labels.detach().cpu(), groups.detach().cpu()
        for code, m in enumerate(self.meters):
            sel = groups == code
            m.update(logits[sel], labels[sel])

    def compute(self) -> dict[str, dict[str, Optional[float]]]:
        out: dict[str, dict[str, Optional[float]]] = {}
        for name, m in zip(GROUP_NAMES, self.meters):
            v, rows = m.compute_with_rows()
            out[name] = {"auc": v["auc"], "logloss": v["logloss"], "rows": rows}
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

    :meth:`update` keeps each step's rows (no collective, no device sync, no copy); :meth:`compute`
    (a collective: every rank calls it at the same step) hands the window's rows to a
    :func:`ctr_metric_module` as one batch, scores them over every rank's rows and resets the
    module: the next window starts empty. One ``update()`` per window, as torchrec's fused update
    (``fused_update_limit``) would do, without its per-step bookkeeping. CPU per step of 512 rows
    with a log line every 10 steps, compute included (one run alternating both, 5 rounds, load 4):
    0.14 ms before RecMetricModule, 0.49 ms with it (about 3 ms a log line, six torchrec metrics'
    update, compute and reset; at the default ``run.log_every=100``, 0.03 ms a step). Adding every
    step to the states instead costs 1.8 ms a step, most of it torchrec's window-buffer op. Keys are prefixed
    ``train_``: ``train_auc``, ``train_logloss``, ``train_ne``, ``train_calibration``,
    ``train_ctr``; None where undefined (no rows; one label class: AUC and NE; no positives:
    calibration).

    Example::

        w = WindowMetrics()
        w.update(out.logit_pure, batch.tgt_label)   # every step
        row.update(w.compute())                     # every run.log_every steps, on every rank
    """

    def __init__(self) -> None:
        self.module = ctr_metric_module()
        self.probs: list[torch.Tensor] = []  # the window's steps as given to the module (views, no copy)
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """``logits``, ``labels``: one step's B_t floats."""
        p, y = torch.sigmoid(logits.detach().float()), labels.detach().float()
        self.probs.append(p)
        self.labels.append(y)

    def state(self) -> Optional[str]:
        """This rank's open window (the rows since the last log line) as one base64 string, or None
        when it is empty: a checkpoint carries it so that a resume logs the line a kill cut with the
        same rows, i.e. the same history as an uninterrupted run."""
        if not self.probs:
            return None
        buf = io.BytesIO()
        torch.save({"p": torch.cat(self.probs).cpu(), "y": torch.cat(self.labels).cpu(),
                    "steps": [int(p.numel()) for p in self.probs]}, buf)
        return base64.b64encode(buf.getvalue()).decode()

    @classmethod
    def restore(cls, state: Optional[str]) -> "WindowMetrics":
        """The window :meth:`state` saved (an empty one for None)."""
        w = cls()
        if state:
            saved: Any = torch.load(io.BytesIO(base64.b64decode(state)), weights_only=True)
            if isinstance(saved, dict):
                w.probs, w.labels = list(saved["p"].split(saved["steps"])), list(saved["y"].split(saved["steps"]))
            else:  # written before RecMetricModule: (logits, labels) of the whole window, one chunk
                w.update(*saved)
        return w

    def compute(self) -> dict[str, Optional[float]]:
        if self.probs:  # a restored window's rows are on the CPU, the new steps' where the model is
            from cctl_rec.distributed.env import collective_device

            dev = collective_device()
            _update(self.module, torch.cat([p.to(dev) for p in self.probs]), torch.cat([y.to(dev) for y in self.labels]))
        v = _read(self.module)
        self.module.reset()
        self.probs, self.labels = [], []
        out = _defined(v)
        return {"train_auc": out["auc"], "train_logloss": v["logloss"] if v["rows"] else None,
                "train_ne": out["ne"], "train_calibration": out["calibration"], "train_ctr": out["ctr"]}
