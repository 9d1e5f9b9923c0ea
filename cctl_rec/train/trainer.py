"""One rank's CCTL training: what a run builds, and one step of it.

:class:`Trainer` builds, in this order and with these seeds, everything a step needs: the CCTL
model with its tables on the meta device, the fused sparse optimizer, TorchRec's plan,
DistributedModelParallel, Adam for the dense parts, the data_parallel tables' optimizer, the IFN
and the first mixed -> pure sync. :meth:`Trainer.step` is one step (per rank; B_t target rows,
B_s = src_ratio * B_t source rows):

1. forward the DMP-sharded model: mixed tower on target + SAN-aligned source rows, pure tower on
   the same target rows, REN lookups;
2. the selector scores the source rows (input detached) -> weights (p_i, or actions a_i) and p;
3. Loss_mixed = mean_i w_i L_i^s + mean_j L_j^t + lambda Loss_ren (Eq. 3, 12); Loss_pure (Eq. 4);
4. reward r = Loss_pure - Loss_tgt (Eq. 5, :mod:`cctl_rec.train.reward`);
5. one backward of Loss_mixed + Loss_pure (their parameters are disjoint); the fused TBE optimizer
   updates tables inside backward; Adam updates towers and SAN;
6. the IFN trains the selector (REINFORCE on the rank-averaged r every ``update_every`` steps in
   paper mode);
7. every k steps the mixed network is copied into the pure network (§2.3.5).

:func:`cctl_rec.train.loop.train` composes it with checkpoints and logging; the benchmark
harness (:class:`cctl_rec.bench.harness.Harness`) is a subclass that times the same step: each part
runs under :meth:`Trainer.span` (a no-op here) and the hooks :meth:`Trainer.mark` and
:meth:`Trainer.before_selector_update` do nothing here.

Example::

    t = Trainer(cfg)
    for step, batch in t.batches(0):
        out = t.step(batch, step)      # out["loss_mixed"], out["reward"]: this rank's values
    if t.needs_final_sync(step):
        t.sync()                       # the pure network is the one served
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist

from cctl_rec.config import TrainConfig
from cctl_rec.data.batch import CCTLBatch
from cctl_rec.data.loader import Dataset, TrainStream, heldout_batches
from cctl_rec.data.prefetch import prefetch
from cctl_rec.distributed.env import init_distributed
from cctl_rec.distributed.plan_report import capture_planner_stats
from cctl_rec.distributed.sharding import DataParallelTables, apply_sparse_optimizer, make_plan, shard
from cctl_rec.models.cctl import CCTL
from cctl_rec.schema import DomainSchema
from cctl_rec.train.checkpoint import TrainState
from cctl_rec.train.ifn import IFN, MODES, per_sample_influence
from cctl_rec.train.losses import ren_terms, scn_losses
from cctl_rec.train.reward import rank_mean, step_reward
from cctl_rec.train.sync import check_same_layout, sync_mixed_to_pure

logger = logging.getLogger(__name__)

LOG_KEYS = ("loss_mixed", "loss_pure", "loss_tgt", "loss_src", "loss_ren", "reward", "cos_id", "cos_seq",
            "p_mean", "p_clean", "p_harmful")
"""The statistics every step logs, in this order."""

STAT_KEYS = LOG_KEYS + ("n_clean", "n_harmful")
"""What :attr:`StepOutput.stats` holds: :data:`LOG_KEYS`, then this rank's counts of clean and
harmful source rows, which weight ``p_clean`` / ``p_harmful`` when ranks are averaged (a rank
without harmful rows has no ``p_harmful`` to contribute)."""

DENSE_MODULES = ("mixed_tower", "san", "pure_tower", "domain_clf")
"""The dense parts Adam trains, in the order their parameters enter it (the checkpoint's indices)."""


def total_steps(cfg: TrainConfig, stream: TrainStream) -> int:
    """Steps of the run: data.epochs passes over the target, at most run.steps."""
    total = stream.steps_per_epoch() * cfg.data.epochs
    return min(total, cfg.run.steps) if cfg.run.steps else total


def finetune_steps(cfg: TrainConfig, total: int) -> int:
    """The Finetune baseline's source-only steps: model.finetune_steps, or model.finetune_frac of the run."""
    return cfg.model.finetune_steps or round(cfg.model.finetune_frac * total)


def check_splits(cfg: TrainConfig, data: Dataset) -> None:
    """Raises ValueError unless ``data`` has the splits the model trains and is scored on."""
    if cfg.model.name == "cctl" and cfg.data.src_ratio == 0:
        raise ValueError("model.name=cctl needs source rows (data.src_ratio > 0); for target only use model.name=dnn")
    if cfg.model.name == "cctl" and not data.has_split("src/train"):
        raise ValueError(f"model.name=cctl needs a src/train split in {cfg.data.path}")
    for split in ("tgt/train", "tgt/valid", "tgt/test"):
        if not data.has_split(split):
            raise ValueError(f"dataset {cfg.data.path} has no {split} split")


def step_influence(module: CCTL, cfg: TrainConfig, out: Any, batch: CCTLBatch, hb: Optional[Any]) -> torch.Tensor:
    """The influence / evidence modes' per-source-row signal for this step (target: the step's own
    rows or a held-out batch ``hb``, ``selector.influence_target``): B_s values, or B_s + B_t with
    ``selector.evidence_reference=target`` (the step's target rows last)."""
    if cfg.selector.influence_target == "heldout_batch":
        assert hb is not None
        with torch.no_grad():
            x_eval, y_eval = module.target_repr(hb.tgt, "mixed", hb.tgt_dense), hb.tgt_label
    else:
        x_eval, y_eval = out.x_tgt, batch.tgt_label
    x, y = out.x_src.float(), batch.src_label
    if cfg.selector.mode == "evidence" and cfg.selector.evidence_reference == "target":
        # the step's own target rows too (B_s + B_t values): the evidence selector's reference
        x, y = torch.cat([x, out.x_tgt.detach().float()]), torch.cat([y, batch.tgt_label])
    return per_sample_influence(module.mixed_tower, x, y, x_eval.float(), y_eval, cfg.selector.influence_loss)


def local_stats(losses: Any, reward: float, p: Optional[torch.Tensor], harmful: Optional[torch.Tensor]) -> list[float]:
    """This rank's :data:`STAT_KEYS` values of one step (``p``: the selector's B_s detached
    probabilities, or None; ``harmful``: B_s bools, or None for a target-only model). A mean over
    no rows is 0."""
    h = harmful
    return [float(losses.mixed.detach()), float(losses.pure.detach()), float(losses.tgt.detach()),
            float(losses.src.detach()), float(losses.ren.detach()), reward, float(losses.cos_id),
            float(losses.cos_seq), float(p.mean()) if p is not None else 0.0,
            float(p[~h].mean()) if p is not None and (~h).any() else 0.0,
            float(p[h].mean()) if p is not None and h.any() else 0.0,
            float((~h).sum()) if h is not None else 0.0, float(h.sum()) if h is not None else 0.0]


@dataclass
class StepOutput:
    """What one step gives back.

    Attributes:
        stats: this rank's :data:`STAT_KEYS` values (averaged over ranks only when logged).
        extra: what the IFN logged (``selector_update``, ``reward_shaped``, ...).
        p: the selector's B_s detached probabilities (the evidence mode's weights), or None.
        logit_pure: the pure tower's B_t detached logits on the step's target rows (the training
            window's CTR metrics, ``metrics.WindowMetrics``), or None.
    """

    stats: list[float]
    extra: dict[str, float] = field(default_factory=dict)
    p: Optional[torch.Tensor] = None
    logit_pure: Optional[torch.Tensor] = None

    def as_dict(self) -> dict[str, Any]:
        """{STAT_KEYS: stats, then extra}."""
        return {**dict(zip(STAT_KEYS, self.stats)), **self.extra}

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)


class Trainer:
    """One rank's training state and its step.

    Args:
        cfg: the training config (``model.name``, batch, selector, k, precision, ...).
        schemas: domain schemas to build the model with instead of the dataset's (the sync
            benchmark grows the target user table); the data must fit them.

    Attributes:
        dmp, module: the DistributedModelParallel model and the CCTL module inside it.
        dense_opt, dp_tables: Adam for towers / SAN, the data_parallel tables' optimizer.
        ifn: the selector and its training rule (None for the target-only DNN).
        plan, planner_stats: TorchRec's sharding plan and the planner's statistics table.
        syncs: mixed -> pure syncs since the run started (the first, at construction, not counted).
        total: the run's steps.
    """

    def __init__(self, cfg: TrainConfig, schemas: Optional[dict[str, DomainSchema]] = None) -> None:
        env = init_distributed(cfg.dist.device, cfg.dist.backend)
        self.cfg, self.rank, self.world, self.device = cfg, env.rank, env.world_size, env.device
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.data = Dataset(cfg.data.path)
        if schemas is not None:
            self.data.schemas = schemas
        check_splits(cfg, self.data)
        self.with_source = cfg.model.name == "cctl"
        # --- model: tables on meta, sparse optimizer fused, planned, sharded
        torch.manual_seed(cfg.run.seed)
        model = CCTL(self.data.schemas, cfg.model, with_source=self.with_source, seq_len=cfg.data.max_seq_len)
        self.stream = TrainStream(self.data, cfg.data, self.rank, self.world, self.with_source, model.shared,
                                  model.positions)
        apply_sparse_optimizer(model, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr, self.device.type)
        with capture_planner_stats() as planner_stats:
            self.plan = make_plan(model, self.world, self.device.type, cfg.dist.sharding, cfg.data.batch_size,
                                  pg=dist.GroupMember.WORLD)
        self.planner_stats: list[str] = planner_stats
        self.dmp = shard(model, self.plan, self.device)
        self.module: CCTL = self.dmp.module
        self.total = total_steps(cfg, self.stream)
        self.finetune = finetune_steps(cfg, self.total)
        # --- optimizers, the IFN, and the first sync (both towers start equal)
        dense = [p for name in DENSE_MODULES if hasattr(self.module, name)
                 for p in getattr(self.module, name).parameters()]
        self.dense_opt = torch.optim.Adam(dense, lr=cfg.optim.dense_lr)
        self.dp_tables = DataParallelTables(self.module, cfg.optim.sparse_optimizer, cfg.optim.sparse_lr)
        torch.manual_seed(cfg.run.seed + 1000 + self.rank)  # per-rank randomness (Bernoulli actions)
        self.ifn: Optional[IFN] = None
        if self.with_source:
            check_same_layout(self.module.mixed_tgt, self.module.pure_tgt)
            self.ifn = IFN(cfg.selector, self.module.width, self.module.schemas["src"], total_steps=self.total)
            self._copy_mixed_to_pure()
        self.state = TrainState(self.dmp, self.dense_opt, self.dp_tables, self.ifn)
        self.syncs = 0
        self.needs_heldout = self.with_source and (
            cfg.scn.reward_source == "heldout_batch" or
            (cfg.selector.needs_influence and cfg.selector.influence_target == "heldout_batch"))
        self.heldout: Optional[Iterator[Any]] = None

    # ------------------------------------------------------------------ hooks (the harness times with them)

    def span(self, name: str) -> ContextManager[Any]:
        """Runs a named part of the step (``forward``, ``losses``, ``sync``, ...); a no-op here."""
        return contextlib.nullcontext()

    def mark(self, name: str) -> None:
        """Notes that a periodic part ran in this step (``sync_ran``, ``update_ran``); a no-op here."""

    def before_selector_update(self, logits: torch.Tensor) -> None:
        """Called with the selector's B_s logits (with graph) right before the IFN trains it."""

    # ------------------------------------------------------------------ data

    def batches(self, start: int) -> Iterator[tuple[int, CCTLBatch]]:
        """(step, batch on the device) for the steps after ``start`` up to the run's end; the
        held-out target stream (when the reward or the influence needs one) starts there too."""
        self.start_heldout(start)
        if start >= self.total:
            return
        it = prefetch(self.stream.iterate(start), self.cfg.data.prefetch)
        for step, batch in zip(range(start + 1, self.total + 1), it):
            yield step, batch.to(self.device)

    def start_heldout(self, start: int) -> None:
        """The held-out target batches from step ``start`` on (none unless a mode needs them)."""
        self.heldout = heldout_batches(self.data, self.cfg.data, self.rank, self.world, start) \
            if self.needs_heldout else None

    # ------------------------------------------------------------------ the step

    def amp(self) -> torch.autocast:
        """run.precision=bf16: the forward in bfloat16, the rest in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.run.precision == "bf16")

    def step(self, batch: CCTLBatch, step: int) -> StepOutput:
        """One training step on ``batch`` (step number ``step``, from 1)."""
        cfg, module, ifn = self.cfg, self.module, self.ifn
        with self.span("forward"), self.amp():
            out = self.dmp(batch)
        sel = weights = p = None
        tgt_weight = 1.0
        with self.span("selector_score"):
            if ifn is not None and out.x_src is not None:
                sel = ifn.select(out.x_src.float(), batch.src_harmful, batch.src_label,  # selector in fp32
                                 out.logit_src)
                weights = sel.weights
                p = sel.weights.detach() if MODES[cfg.selector.mode].logs_weights else sel.p.detach()
                if self.finetune:  # Finetune baseline: source, then target
                    pre = step <= self.finetune
                    weights, tgt_weight = torch.full_like(weights, 1.0 if pre else 0.0), 0.0 if pre else 1.0
        with self.span("losses"), self.amp():  # under autocast the BCE terms run in fp32
            with self.span("ren"):  # REN's inputs are the tables' fp32 outputs
                ren = ren_terms(out, batch)
            losses = scn_losses(out, batch, weights, cfg.model.loss_reduction,
                                cfg.ren.weight if cfg.ren.enabled else 0.0, cfg.model.dann_weight, tgt_weight, ren)
        with self.span("reward"):
            hb = next(self.heldout) if self.heldout is not None else None
            reward = step_reward(losses, module, hb if cfg.scn.reward_source == "heldout_batch" else None)
        infl = None
        with self.span("influence"):
            if ifn is not None and ifn.needs_influence and out.x_src is not None:
                infl = step_influence(module, cfg, out, batch, hb)
        self.backward(losses)
        with self.span("metrics"):
            stats = local_stats(losses, reward, p, batch.src_harmful)
        extra: dict[str, float] = {}
        with self.span("selector_update"):
            if ifn is not None and sel is not None:
                self.before_selector_update(sel.logits)
                # REINFORCE needs one reward on every rank; the other modes do not read it
                r = rank_mean(reward) if ifn.rl is not None else reward
                gids = ifn.groups.ids(module, batch) if ifn.groups is not None else None
                extra = ifn.step(step, sel.logits, r, sel.actions, batch.src_harmful, infl, batch.src_label, gids,
                                 out.logit_src, batch.tgt_label, out.logit_tgt, sel.p)
                if extra.get("selector_update"):
                    self.mark("update_ran")
        with self.span("sync"):
            if self.with_source and step % cfg.scn.sync_every == 0:
                self.sync()
                self.mark("sync_ran")
        return StepOutput(stats, extra, p, out.logit_pure.detach())

    def backward(self, losses: Any) -> None:
        """One backward of Loss_mixed + Loss_pure (the fused TBE optimizer updates the tables inside
        it), then Adam and the data_parallel tables' optimizer."""
        with self.span("backward_opt"):
            self.dense_opt.zero_grad(set_to_none=True)
            (losses.mixed + losses.pure).backward()
            with self.span("optimizer_dense"):
                self.dense_opt.step()
                self.dp_tables.step()

    # ------------------------------------------------------------------ the sync

    def _copy_mixed_to_pure(self) -> None:
        sync_mixed_to_pure(self.module, self.dense_opt, self.cfg.scn.sync_optimizer_state, self.dp_tables)

    def sync(self) -> None:
        """One mixed -> pure sync (§2.3.5), counted in :attr:`syncs`."""
        self._copy_mixed_to_pure()
        self.syncs += 1

    def needs_final_sync(self, step: int) -> bool:
        """Whether the pure network at the end of step ``step`` is not yet the mixed one (the
        served network is the pure network after a last sync; step k, 2k, ... synced already)."""
        return self.with_source and step % self.cfg.scn.sync_every != 0
