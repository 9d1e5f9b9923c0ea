"""The training log: each step's statistics, averaged over ranks only when they are read.

Every step hands :meth:`RunLog.add` this rank's :data:`~cctl_rec.train.trainer.LOG_KEYS` values;
they wait on the rank until the next log line (``run.log_every``), checkpoint or the end of the
run, when one all-reduce averages all of them over ranks. They are then summed step by step, in
step order, into the log window and the reward sum: the same numbers as averaging each step on its
own, with one collective per log line instead of one per step.

Example::

    log = RunLog(meta={}, start=0)
    log.add(out.stats)                  # every step
    row = log.close_window(step, {...}) # every log_every steps: the window's means, into history
"""

from __future__ import annotations

from typing import Any

import torch

from cctl_rec.distributed.env import allreduce_mean_, collective_device
from cctl_rec.train.trainer import LOG_KEYS, STAT_KEYS

_WEIGHTED = ((LOG_KEYS.index("p_clean"), STAT_KEYS.index("n_clean")),
             (LOG_KEYS.index("p_harmful"), STAT_KEYS.index("n_harmful")))
"""(mean, its row count) columns: averaged over ranks weighted by the rows each rank had."""


class RunLog:
    """The history of log rows, the open log window and the reward sum of a run.

    Args:
        meta: the trainer.json of the checkpoint the run resumes from ({} for a new run).
        start: the step the run resumes at (the window of a checkpoint at ``start`` reopens).
    """

    def __init__(self, meta: dict[str, Any], start: int) -> None:
        self.history: list[dict[str, Any]] = list(meta.get("history", []))
        self.window = {k: 0.0 for k in LOG_KEYS}
        self.n_in_window = 0
        if meta.get("log_window") and meta["step"] == start:  # the log line a kill cut: same history on resume
            self.n_in_window, self.window = meta["log_window"][0], dict(meta["log_window"][1])
        self.reward_sum = float(meta.get("reward_sum", 0.0))
        self._pending: list[list[float]] = []

    def add(self, stats: list[float]) -> None:
        """One step's values on this rank (:data:`~cctl_rec.train.trainer.STAT_KEYS` order)."""
        self._pending.append(stats)

    def reduce(self) -> None:
        """Averages the steps added since the last call over ranks (one all-reduce; every rank
        must call it at the same step) and adds them, step by step, to the window and reward sum."""
        if not self._pending:
            return
        t = torch.tensor(self._pending, dtype=torch.float64, device=collective_device())  # steps X STAT_KEYS
        for m, n in _WEIGHTED:  # p_clean, p_harmful: the mean over every rank's rows, not of the ranks' means
            t[:, m] *= t[:, n]
        allreduce_mean_([t])
        for m, n in _WEIGHTED:
            t[:, m] = torch.where(t[:, n] > 0, t[:, m] / t[:, n].clamp_min(1e-30), torch.zeros_like(t[:, m]))
        for row in t[:, :len(LOG_KEYS)].cpu().tolist():
            for k, v in zip(LOG_KEYS, row):
                self.window[k] += v
            self.reward_sum += row[LOG_KEYS.index("reward")]
            self.n_in_window += 1
        self._pending = []

    def close_window(self, step: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The log row of step ``step``: the window's means over ranks and steps, then ``extra``;
        appended to the history, and a new window opens. A collective."""
        self.reduce()
        avg = {k: v / self.n_in_window for k, v in self.window.items()}
        row = {"step": step, **avg, **extra}
        self.history.append(row)
        self.window = {k: 0.0 for k in LOG_KEYS}
        self.n_in_window = 0
        return row

    def meta(self) -> dict[str, Any]:
        """What a checkpoint keeps of the log (reduced first: a collective)."""
        self.reduce()
        return {"reward_sum": self.reward_sum, "history": self.history,
                "log_window": [self.n_in_window, self.window]}
