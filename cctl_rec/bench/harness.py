"""The training step of :func:`cctl_rec.train.loop.train`, with timers: a :class:`Trainer` whose parts are timed.

``train()`` runs :meth:`Trainer.step` inside a loop with logging, TensorBoard and checkpoints
around it; the benchmarks need the step itself, piece by piece. :class:`Harness` is the trainer
(same build, same seeds, same step) with :meth:`Trainer.span` timing each part of the step under its
name (``forward``, ``selector_score``, ``losses``, ``ren``, ``reward``, ``influence``,
``backward_opt``, ``metrics``, ``selector_update``, ``sync``) into :attr:`Harness.sections`.
``tests/test_bench.py`` checks that a harness run and ``train()`` give the same model.

With ``hooks=True`` the parts inside the forward and the backward are timed too:

- forward hooks on the embedding collections (``pure_tgt``, ``mixed_tgt``, ``src``: lookups,
  including TorchRec's input and output dist), the towers and SAN;
- full backward hooks on the towers and SAN's token MLPs: the time from their output gradient
  to their input gradient.

Example::

    h = Harness(cfg, hooks=True)
    for i in range(1, 11):
        h.sections.new_step()
        h.step(h.next_batch(), i)
    h.sections.medians()   # {"forward": {...}, "embeddings": {...}, "backward_opt": {...}, ...}
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torchrec import KeyedJaggedTensor

from cctl_rec.config import TrainConfig
from cctl_rec.data.batch import CCTLBatch
from cctl_rec.data.prefetch import prefetch
from cctl_rec.models.cctl import CCTL
from cctl_rec.schema import DomainSchema
from cctl_rec.train.evaluation import evaluate
from cctl_rec.train.losses import scn_losses
from cctl_rec.train.trainer import Trainer

from cctl_rec.bench.common import Sections

logger = logging.getLogger(__name__)

EMBEDDINGS = ("pure_tgt", "mixed_tgt", "src")
TOWERS = ("pure_tower", "mixed_tower")


class Harness(Trainer):
    """One rank's trainer, as ``train()`` builds it, its step timed part by part.

    Args:
        cfg: the training config (``model.name``, batch, selector, k, precision, ...).
        schemas: domain schemas to build the model with instead of the dataset's (the sync
            benchmark grows the target user table); the data must fit them.
        hooks: time the embeddings, towers and SAN inside forward and backward.

    :meth:`step` returns this rank's logged values (``out["loss_mixed"]``, ``out["reward"]``,
    ``out["p_mean"]``, ...) and what the IFN logged (``out.get("selector_update")``).
    """

    def __init__(self, cfg: TrainConfig, schemas: Optional[dict[str, DomainSchema]] = None,
                 hooks: bool = False) -> None:
        super().__init__(cfg, schemas)
        self.start_heldout(0)
        self.batches_it: Iterator[CCTLBatch] = prefetch(self.stream.iterate(0), cfg.data.prefetch)
        self.sections = Sections()
        self.on_logits: Optional[Callable[[torch.Tensor], None]] = None
        """Called with the selector's logits (with graph) before the IFN step (the stress checks)."""
        self._handles: list[Any] = []
        if hooks:
            self._install_hooks()

    # ------------------------------------------------------------------ the trainer's hooks, timed

    def span(self, name: str) -> ContextManager[Any]:
        return self.sections.span(name)

    def mark(self, name: str) -> None:
        self.sections.add(name, 0.0)  # a marker: the per-step statistics leave this step out

    def before_selector_update(self, logits: torch.Tensor) -> None:
        if self.on_logits is not None:
            self.on_logits(logits)

    # ------------------------------------------------------------------ timing hooks inside forward / backward

    def _install_hooks(self) -> None:
        m, t = self.module, self.sections

        def fwd(mod: torch.nn.Module, name: str) -> None:
            starts: list[float] = []
            self._handles.append(mod.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
            self._handles.append(mod.register_forward_hook(
                lambda *_: t.add(name, time.perf_counter() - starts.pop())))

        def bwd(mod: torch.nn.Module, name: str) -> None:
            starts: list[float] = []
            self._handles.append(mod.register_full_backward_pre_hook(
                lambda *_: starts.append(time.perf_counter())))
            self._handles.append(mod.register_full_backward_hook(
                lambda *_: t.add(name, time.perf_counter() - starts.pop()) if starts else None))

        for n in EMBEDDINGS:
            if hasattr(m, n):
                fwd(getattr(m, n), "embeddings")
        for n in TOWERS:
            if hasattr(m, n):
                fwd(getattr(m, n), "towers")
                bwd(getattr(m, n), "towers_bwd")
        if hasattr(m, "san"):
            fwd(m.san, "san")
            for sub in m.san.maps.values():
                if any(p.requires_grad for p in sub.parameters()):
                    bwd(sub, "san_bwd")

    def close(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ data, the ablation, evaluation

    def next_batch(self) -> CCTLBatch:
        """The next training batch (Parquet read + KJT build + ``to(device)``), timed as ``data``."""
        with self.sections.span("data"):
            try:
                batch = next(self.batches_it)
            except StopIteration:  # benchmarks may run past one pass: start the split again
                self.batches_it = prefetch(self.stream.iterate(0), self.cfg.data.prefetch)
                batch = next(self.batches_it)
            return batch.to(self.device)

    def scn_step(self, batch: CCTLBatch) -> float:
        """The ablation "SCN towers only": the same model and batch through the mixed tower (target
        + SAN-aligned source rows, every weight 1) and the pure tower (target rows), their losses,
        backward and optimizers; no selector, REN (its lookup rows are dropped from the source
        KJT), reward, metrics or sync. SAN remains (the source rows need it to reach the tower):
        its forward and backward are timed by the hooks (``san``, ``san_bwd``). Returns the loss."""
        cfg, t = self.cfg, self.sections
        if batch.src is not None:
            batch = dataclasses.replace(batch, src=_first_rows(batch.src, batch.num_src))
        with t.span("forward"), self.amp():
            out = self.dmp(batch)
        with t.span("losses"), self.amp():
            out = dataclasses.replace(out, ren_id_s=None, ren_id_t=None, ren_seq_s=None, ren_seq_t=None)
            losses = scn_losses(out, batch, None, cfg.model.loss_reduction, 0.0)
        self.backward(losses)
        return float(losses.pure.detach())

    def evaluate(self, split: str = "tgt/test") -> dict[str, float]:
        """The pure tower's AUC / logloss on a target split (``train()``'s final evaluation)."""
        return evaluate(self.module, self.data, split, self.cfg, self.rank, self.world)["pure"]


def _shards(t: Any) -> list[torch.Tensor]:
    return [s.tensor for s in t.local_shards()] if hasattr(t, "local_shards") else [t]


@torch.no_grad()
def pure_equals_mixed(module: CCTL, fused_state: bool = True) -> list[str]:
    """What differs between the pure and the mixed network on this rank (empty: identical):
    every local shard of the target tables, the towers' parameters and, with ``fused_state``,
    the fused TBE optimizer state."""
    bad = []
    sm, sp = module.mixed_tgt.state_dict(), module.pure_tgt.state_dict()
    for k in sm:
        if not all(torch.equal(a, b) for a, b in zip(_shards(sm[k]), _shards(sp[k]))):
            bad.append(f"table {k}")
    for (n, a), b in zip(module.mixed_tower.named_parameters(), module.pure_tower.parameters()):
        if not torch.equal(a, b):
            bad.append(f"tower {n}")
    fm = getattr(module.mixed_tgt, "fused_optimizer", None)
    fp = getattr(module.pure_tgt, "fused_optimizer", None)
    if fused_state and fm is not None and fp is not None:
        a, b = fm.state_dict()["state"], fp.state_dict()["state"]
        for (ka, va), (kb, vb) in zip(sorted(a.items()), sorted(b.items())):
            for name in va:
                if not all(torch.equal(x, y) for x, y in zip(_shards(va[name]), _shards(vb[name]))):
                    bad.append(f"optimizer state {ka}/{name}")
    return bad


def _first_rows(kjt: KeyedJaggedTensor, n: int) -> KeyedJaggedTensor:
    """The first ``n`` rows of every key of ``kjt`` (a KJT of stride ``n``)."""
    keys, vals, lens = kjt.keys(), [], []
    for k in keys:
        jt = kjt[k]
        length = jt.lengths()[:n]
        vals.append(jt.values()[:int(length.sum())])
        lens.append(length)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(vals), lengths=torch.cat(lens))


def run_steps(h: Harness, n: int, first_step: int = 1) -> list[dict[str, Any]]:
    """``n`` harness steps (data fetch included), each its own ``Sections`` entry."""
    out = []
    for i in range(first_step, first_step + n):
        h.sections.new_step()
        b = h.next_batch()
        out.append(h.step(b, i))
    return out
