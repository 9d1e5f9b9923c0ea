"""The training step of :func:`cctl_rec.train.loop.train`, built and run the same way, with timers.

``train()`` runs its steps inside one loop with logging, TensorBoard and checkpoints around them;
the benchmarks need the step itself, piece by piece. :class:`Harness` builds what ``train()``
builds, in the same order and with the same seeds (the CCTL model on the meta device, the fused
sparse optimizer, TorchRec's plan, DistributedModelParallel, Adam, the data_parallel tables'
optimizer, the IFN, the initial sync), and :meth:`Harness.step` runs the statements of one
iteration of ``train()``'s loop, each part under a named timer. ``tests/test_bench.py`` checks
that a harness run and ``train()`` give the same model (same target test AUC) on the same data.

With ``hooks=True`` the parts inside the forward and the backward are timed too:

- forward hooks on the embedding collections (``pure_tgt``, ``mixed_tgt``, ``src``: lookups,
  including TorchRec's input and output dist), the towers and SAN;
- full backward hooks on the towers and SAN's token MLPs: the time from their output gradient
  to their input gradient;
- REN's loss (``ren_loss``, called inside ``scn_losses``) through a timing wrapper.

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
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torchrec import KeyedJaggedTensor

from cctl_rec.config import TrainConfig
from cctl_rec.data.batch import CCTLBatch
from cctl_rec.data.loader import Dataset, TrainStream, heldout_batches
from cctl_rec.data.prefetch import prefetch
from cctl_rec.distributed.env import init_distributed
from cctl_rec.distributed.sharding import DataParallelTables, apply_sparse_optimizer, make_plan, shard
from cctl_rec.models.cctl import CCTL
from cctl_rec.schema import DomainSchema
from cctl_rec.train import losses as losses_mod
from cctl_rec.train.ifn import IFN
from cctl_rec.train.losses import scn_losses
from cctl_rec.train.loop import (evaluate, finetune_steps, heldout_reward, step_influence, step_stats,
                                 total_steps)
from cctl_rec.train.sync import check_same_layout, sync_mixed_to_pure

from cctl_rec.bench.common import Sections

logger = logging.getLogger(__name__)

EMBEDDINGS = ("pure_tgt", "mixed_tgt", "src")
TOWERS = ("pure_tower", "mixed_tower")


class Harness:
    """One rank's trainer state, as ``train()`` builds it, and its step.

    Args:
        cfg: the training config (``model.name``, batch, selector, k, precision, ...).
        schemas: domain schemas to build the model with instead of the dataset's (the sync
            benchmark grows the target user table); the data must fit them.
        hooks: time the embeddings, towers, SAN and REN inside forward and backward.
    """

    def __init__(self, cfg: TrainConfig, schemas: Optional[dict[str, DomainSchema]] = None,
                 hooks: bool = False) -> None:
        env = init_distributed(cfg.dist.device, cfg.dist.backend)
        self.cfg, self.rank, self.world, self.device = cfg, env.rank, env.world_size, env.device
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.data = Dataset(cfg.data.path)
        if schemas is not None:
            self.data.schemas = schemas
        self.with_source = cfg.model.name == "cctl"
        # --- as train(): seed, model on meta, stream, fused sparse optimizer, plan, DMP
        torch.manual_seed(cfg.run.seed)
        model = CCTL(self.data.schemas, cfg.model, with_source=self.with_source, seq_len=cfg.data.max_seq_len)
        self.stream = TrainStream(self.data, cfg.data, self.rank, self.world, self.with_source, model.shared,
                                  model.positions)
        apply_sparse_optimizer(model, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr, self.device.type)
        self.plan = make_plan(model, self.world, self.device.type, cfg.dist.sharding, cfg.data.batch_size,
                              pg=dist.GroupMember.WORLD)
        self.dmp = shard(model, self.plan, self.device)
        self.module: CCTL = self.dmp.module
        self.total = total_steps(cfg, self.stream)
        dense = [p for name in ("mixed_tower", "san", "pure_tower", "domain_clf") if hasattr(self.module, name)
                 for p in getattr(self.module, name).parameters()]
        self.dense_opt = torch.optim.Adam(dense, lr=cfg.optim.dense_lr)
        self.dp_tables = DataParallelTables(self.module, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr)
        torch.manual_seed(cfg.run.seed + 1000 + self.rank)
        self.ifn: Optional[IFN] = None
        if self.with_source:
            check_same_layout(self.module.mixed_tgt, self.module.pure_tgt)
            self.ifn = IFN(cfg.selector, self.module.width, self.module.schemas["src"], total_steps=self.total)
            sync_mixed_to_pure(self.module, self.dense_opt, cfg.scn.sync_optimizer_state, self.dp_tables)
        self.heldout = heldout_batches(self.data, cfg.data, self.rank, self.world, 0) if self.with_source and (
            cfg.scn.reward_source == "heldout_batch" or
            (cfg.selector.needs_influence and cfg.selector.influence_target == "heldout_batch")
        ) else None
        self.batches: Iterator[CCTLBatch] = prefetch(self.stream.iterate(0), cfg.data.prefetch)
        self.sections = Sections()
        self.syncs = 0
        self.on_logits: Optional[Callable[[torch.Tensor], None]] = None
        """Called with the selector's logits (with graph) before the IFN step (the stress checks)."""
        self._handles: list[Any] = []
        self._timed_ren = False
        if hooks:
            self._install_hooks()

    # ------------------------------------------------------------------ timing hooks

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
        _install_ren_timer()
        self._timed_ren = True

    def close(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._timed_ren = False

    # ------------------------------------------------------------------ the step

    def amp(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.run.precision == "bf16")

    def next_batch(self) -> CCTLBatch:
        """The next training batch (Parquet read + KJT build + ``to(device)``), timed as ``data``."""
        with self.sections.span("data"):
            try:
                batch = next(self.batches)
            except StopIteration:  # benchmarks may run past one pass: start the split again
                self.batches = prefetch(self.stream.iterate(0), self.cfg.data.prefetch)
                batch = next(self.batches)
            return batch.to(self.device)

    def step(self, batch: CCTLBatch, step: int) -> dict[str, Any]:
        """One iteration of ``train()``'s loop on ``batch`` (step number ``step``, from 1).

        Returns the rank-averaged logged values (``loss_mixed``, ``reward``, ``p_mean``, ...) and
        what the IFN logged, e.g. ``selector_update``.
        """
        global _REN_SECTIONS
        _REN_SECTIONS = self.sections if self._timed_ren else None
        try:
            return self._step(batch, step)
        finally:
            _REN_SECTIONS = None

    def _step(self, batch: CCTLBatch, step: int) -> dict[str, Any]:
        cfg, t, module, ifn = self.cfg, self.sections, self.module, self.ifn
        with_source = self.with_source
        with t.span("forward"), self.amp():
            out = self.dmp(batch)
        weights = logits = actions = None
        with t.span("selector_score"):
            if with_source and out.x_src is not None:
                assert ifn is not None
                weights, logits, actions = ifn.weights(out.x_src.float(), batch.src_harmful, batch.src_label,
                                                       out.logit_src)
            tgt_weight = 1.0
            ft = finetune_steps(cfg, self.total)
            if ft and weights is not None:  # Finetune baseline: source, then target
                pre = step <= ft
                weights, tgt_weight = torch.full_like(weights, 1.0 if pre else 0.0), 0.0 if pre else 1.0
        with t.span("losses"), self.amp():
            losses = scn_losses(out, batch, weights, cfg.model.loss_reduction,
                                cfg.ren.weight if cfg.ren.enabled else 0.0, cfg.model.dann_weight, tgt_weight)
        with t.span("reward"):
            reward = float(losses.reward)
            hb = next(self.heldout) if self.heldout is not None else None
            if with_source and cfg.scn.reward_source == "heldout_batch":
                assert hb is not None
                reward = heldout_reward(module, hb)
        infl = None
        with t.span("influence"):
            if ifn is not None and ifn.needs_influence and out.x_src is not None:
                infl = step_influence(module, cfg, out, batch, hb)
        self._backward_opt(losses)
        with t.span("metrics"):
            h = batch.src_harmful
            glob = step_stats(losses, reward, torch.sigmoid(logits.detach()) if logits is not None else None, h)
        extra: dict[str, float] = {}
        with t.span("selector_update"):
            if ifn is not None and logits is not None:
                if self.on_logits is not None:
                    self.on_logits(logits)
                gids = ifn.groups.ids(module, batch) if ifn.groups is not None else None
                extra = ifn.step(step, logits, glob["reward"], actions, h, infl, batch.src_label, gids,
                                 out.logit_src, batch.tgt_label, out.logit_tgt)
                if extra.get("selector_update"):
                    t.add("update_ran", 0.0)  # a marker: the per-step statistics leave this step out
        with t.span("sync"):
            if with_source and step % cfg.scn.sync_every == 0:
                sync_mixed_to_pure(module, self.dense_opt, cfg.scn.sync_optimizer_state, self.dp_tables)
                self.syncs += 1
                t.add("sync_ran", 0.0)
        return {**glob, **extra}

    def scn_step(self, batch: CCTLBatch) -> float:
        """The ablation "SCN towers only": the same model and batch through the mixed tower (target
        + SAN-aligned source rows, every weight 1) and the pure tower (target rows), their losses,
        backward and optimizers; no selector, REN (its lookup rows are dropped from the source
        KJT), reward, metrics or sync. SAN remains (the source rows need it to reach the tower):
        its forward and backward are timed by the hooks (``san``, ``san_bwd``). Returns the loss."""
        global _REN_SECTIONS
        _REN_SECTIONS = self.sections if self._timed_ren else None
        try:
            return self._scn_step(batch)
        finally:
            _REN_SECTIONS = None

    def _scn_step(self, batch: CCTLBatch) -> float:
        cfg, t = self.cfg, self.sections
        if batch.src is not None:
            batch = dataclasses.replace(batch, src=_first_rows(batch.src, batch.num_src))
        with t.span("forward"), self.amp():
            out = self.dmp(batch)
        with t.span("losses"), self.amp():
            out = dataclasses.replace(out, ren_id_s=None, ren_id_t=None, ren_seq_s=None, ren_seq_t=None)
            losses = scn_losses(out, batch, None, cfg.model.loss_reduction, 0.0)
        self._backward_opt(losses)
        return float(losses.pure.detach())

    def _backward_opt(self, losses: Any) -> None:
        """One backward of Loss_mixed + Loss_pure, then the dense and data_parallel optimizers."""
        t = self.sections
        with t.span("backward_opt"):
            self.dense_opt.zero_grad(set_to_none=True)
            (losses.mixed + losses.pure).backward()
            with t.span("optimizer_dense"):
                self.dense_opt.step()
                self.dp_tables.step()

    def sync(self) -> None:
        """One mixed -> pure sync, as ``train()`` does every k steps."""
        sync_mixed_to_pure(self.module, self.dense_opt, self.cfg.scn.sync_optimizer_state, self.dp_tables)

    def evaluate(self, split: str = "tgt/test") -> dict[str, float]:
        """The pure tower's AUC / logloss on a target split (``train()``'s final evaluation)."""
        return evaluate(self.module, self.data, split, self.cfg, self.rank, self.world)["pure"]


_REN_SECTIONS: Optional[Sections] = None
"""Where the REN timer records: the sections of the harness whose step is running."""


def _install_ren_timer() -> None:
    """Wraps ``ren_loss`` as ``scn_losses`` calls it (once per process) to time it as ``ren``."""
    orig = losses_mod.ren_loss
    if getattr(orig, "_bench_timed", False):
        return

    def ren_timed(*args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*args, **kw)
        finally:
            if _REN_SECTIONS is not None:
                _REN_SECTIONS.add("ren", time.perf_counter() - t0)

    ren_timed._bench_timed = True  # type: ignore[attr-defined]
    losses_mod.ren_loss = ren_timed


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
