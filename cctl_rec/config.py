"""Typed configuration: frozen dataclasses, a strict YAML loader and ``a.b=value`` overrides.

Unknown keys are refused with their dotted path; every value is type-checked; ranges are checked
in ``__post_init__``. The resolved config is written into every run directory.

Example::

    cfg = load_config("configs/cctl_tiny.yaml", ["selector.alpha=0.5", "run.steps=200"])
    cfg.selector.alpha  # 0.5
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from cctl_rec.schema import HEAD_SEQUENCES

SelectorMode = Literal["paper", "bernoulli", "influence", "evidence", "fixed", "oracle", "supervised"]
ModelName = Literal["cctl", "dnn"]
TARGET_ONLY_HEADS = tuple(HEAD_SEQUENCES)
"""Heads that attend over the target rows' behaviour sequences (trained on target rows only)."""
CROSS_DOMAIN_HEADS = ("conet",)
"""Heads with a source column that only source rows train."""


_SCI = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in scientific notation, which YAML 1.1 reads as a string unless it has a dot."""


MAX_WIDTH = 1 << 16
"""Largest embedding dimension or hidden width a config may ask for."""
MAX_SEQ_LEN = 4096
MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused unread."""
MAX_CONFIG_VALUES = 10_000
"""Values (scalars, list items, mapping entries) a config may expand to, YAML aliases counted at
every use: a few hundred bytes of nested aliases can expand to billions."""
MAX_CONFIG_CHARS = 100_000
"""Characters in all strings and keys of a config together (aliases counted at every use)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _widths(name: str, widths: tuple[int, ...]) -> None:
    _check(len(widths) <= 64 and all(h <= MAX_WIDTH for h in widths),
           f"{name} must list at most 64 widths of at most {MAX_WIDTH}, got {_short(list(widths))}")


def _short(value: Any, limit: int = 120) -> str:
    from cctl_rec.safe_io import short

    return short(value, limit)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = "data/tiny"
    """Dataset root written by `cctl-rec datagen` or `cctl-rec convert` (holds manifest.json)."""
    batch_size: int = 512
    """Target samples per step and rank."""
    src_ratio: float = 4.0
    """Source samples per target sample in a step (source batch = round(batch_size * src_ratio))."""
    epochs: int = 1
    """Passes over the target train split. 1 = the paper's one-pass streaming regime, where the
    in-batch reward (Eq. 5) is unbiased."""
    max_seq_len: int = 20
    """Behaviour sequences longer than this are truncated to their most recent items."""
    eval_batch_size: int = 4096
    long_seq: Literal["truncate", "fail"] = "truncate"
    """A behaviour sequence longer than max_seq_len: truncate (keep the newest items) or fail
    (`cctl-rec train` then scans the sequences before it starts)."""
    verify: Literal["none", "size", "sha256"] = "sha256"
    """What `cctl-rec train` checks of every shard against manifest.json before it starts: sha256
    (and size; each rank hashes its share of the files), size only (for very large data), or none."""
    prefetch: int = 2
    """Training batches read ahead on a background thread (0: read each batch in the step). Same
    batches, same order: only when they are built changes."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        _check(self.prefetch >= 0, f"data.prefetch must be >= 0, got {self.prefetch}")
        _check(self.src_ratio >= 0, f"data.src_ratio must be >= 0, got {self.src_ratio}")
        _check(self.src_ratio == 0 or round(self.batch_size * self.src_ratio) >= 1,
               f"data.src_ratio={self.src_ratio} gives round({self.batch_size} x {self.src_ratio}) = 0 source rows per "
               f"step; expected 0 or at least {0.5 / self.batch_size:.3g} (one source row per step at "
               f"data.batch_size={self.batch_size})")
        _check(self.epochs > 0, f"data.epochs must be > 0, got {self.epochs}")
        _check(0 < self.max_seq_len <= MAX_SEQ_LEN, f"data.max_seq_len must be in [1, {MAX_SEQ_LEN}], got "
                                                    f"{self.max_seq_len}")
        _check(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0, got {self.eval_batch_size}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: ModelName = "cctl"
    """cctl: SCN + IFN + REN. dnn: the target-only single tower (the paper's DNN baseline)."""
    embedding_dim: int = 8
    tower: tuple[int, ...] = (256, 128, 32)
    """Hidden widths of the SCN towers (mixed and pure identical); a 1-wide output layer follows.
    The paper: (1024, 512, 128) industrial, (256, 128, 32) public."""
    san_hidden: tuple[int, ...] = (32,)
    """Hidden widths of each SAN token MLP (Eq. 7)."""
    share_attributes: bool = True
    """Source attribute features (same name, token and cardinality as a target feature, not an
    ID) are looked up in the mixed network's target tables; ID tables stay separate (REN).
    False: every source feature has its own table."""
    share_ids: bool = False
    """Source rows look up user_id, item_id and seq in the mixed network's target tables too: one
    embedding per id across domains (no REN possible: it needs the two ID tables). The paper keeps
    dual ID tables (REN, default); its ablation without REN leaves "the representations of
    different domains ... close to each other"."""
    head: Literal["mlp", "lr", "deepfm", "afm", "star", "din", "conet", "minet"] = "mlp"
    """The towers' architecture over the per-field embeddings (mixed and pure identical): mlp (the
    SCN tower, the paper's DNN), lr, deepfm or afm (Table 2's single-domain baselines; with
    model.name=dnn they are the target-only models), star (STAR: shared x per-domain weights;
    source rows use the source factors), conet (CoNet: two columns with shared cross units; source
    rows read the source column; needs model.name=cctl), din (DIN: target attention over the
    target behaviour sequence; model.name=dnn) or minet (MiNet: item- and interest-level attention
    over the user, the source-domain sequence other_seq and the target sequence; model.name=dnn)."""
    dann_weight: float = 0.0
    """> 0: DANN baseline — a domain classifier behind a gradient reversal reads the mixed tower's
    input (target vs SAN-aligned source rows); its loss times this weight joins Loss_mixed."""
    finetune_steps: int = 0
    """> 0: the Finetune baseline — the mixed network is trained on source rows only (through SAN,
    every weight 1, target loss off) for this many steps, then on target rows only; use it with
    selector.mode=fixed."""
    finetune_frac: float = 0.0
    """> 0: the Finetune baseline with its source-only phase given as this share of the run's steps
    (so the same setting fits runs of any length); model.finetune_steps, when set, wins."""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """Eq. 3/4 write sums; mean (per domain) keeps the scale independent of the batch size."""

    def __post_init__(self) -> None:
        _check(0 < self.embedding_dim <= MAX_WIDTH and self.embedding_dim % 4 == 0,
               f"model.embedding_dim must be a multiple of 4 in [4, {MAX_WIDTH}] (fbgemm's TBE kernels need rows of "
               f"a multiple of 4), got {self.embedding_dim}")
        _check(len(self.tower) > 0, "model.tower must list at least one hidden width, got []")
        _check(all(h > 0 for h in self.tower), f"model.tower widths must be > 0, got {list(self.tower)}")
        _check(all(h > 0 for h in self.san_hidden), f"model.san_hidden widths must be > 0, got {list(self.san_hidden)}")
        _widths("model.tower", self.tower)
        _widths("model.san_hidden", self.san_hidden)
        _check(self.dann_weight >= 0, f"model.dann_weight must be >= 0, got {self.dann_weight}")
        _check(self.finetune_steps >= 0, f"model.finetune_steps must be >= 0, got {self.finetune_steps}")
        _check(0.0 <= self.finetune_frac < 1.0, f"model.finetune_frac must be in [0, 1), got {self.finetune_frac}")
        _check(not (self.head in TARGET_ONLY_HEADS and self.name != "dnn"),
               f"model.head={self.head} is trained on target rows only (the source rows' SAN output has no "
               f"per-position sequences); use it with model.name=dnn, got model.name={self.name}")
        _check(not (self.head in CROSS_DOMAIN_HEADS and self.name != "cctl"),
               f"model.head={self.head} needs source rows for its source column; use it with model.name=cctl "
               f"(and selector.mode=fixed for the plain baseline), got model.name={self.name}")


@dataclass(frozen=True, kw_only=True)
class SelectorConfig:
    mode: SelectorMode = "evidence"
    """evidence (the product default, not in the paper): every source weight starts at 1 and drops
    only where the evidence says the rows hurt (cctl_rec/train/evidence.py, docs/selector.md).
    paper: soft weights p_i, REINFORCE on grad log p_i (Eq. 8-9). bernoulli: a_i ~ Bernoulli(p_i)
    used as the weight, grad of the action's log-likelihood (DVRL). influence: per-sample
    first-order influence on the target loss (not in the paper). fixed: every weight 1 (CCTL w/o
    IFN). oracle: weight 1 on clean, 0 on harmful samples (needs is_harmful; analysis only).
    supervised: the selector fitted to the is_harmful flag (a plumbing check; analysis only)."""
    hidden: tuple[int, ...] = (64, 32)
    alpha: float = 1.0
    """Scale of the REINFORCE update (Eq. 9); 0 = plain multi-domain training, every source weight 1
    (the paper, §3.5: "alpha = 0 ... degenerates into a multi-domain model")."""
    gamma: float = 0.8
    """Discount of the accumulated reward r_accu = sum_j gamma^j r_{k+j}."""
    update_every: int = 1000
    """Steps between two selector updates (the paper: 1000). 0 = derived from the run's length:
    total steps / 20, between 1 and 1000, so a run of 80-400 steps (a sparse target, a few epochs)
    gets ~20 updates, and a streaming run of 20k+ steps the paper's 1000 (:func:`update_every_for`)."""
    lr: float = 1e-3
    """Learning rate of the selector's own optimizer in influence/supervised modes."""
    logit_clamp: float = 8.0
    """|logit| bound of the selector: keeps p in [sigmoid(-c), sigmoid(c)] so REINFORCE cannot
    diverge when rewards keep one sign."""
    reward_norm: bool = False
    """Divide each reward by its running RMS so alpha does not depend on the reward's scale."""
    ema_baseline: float = 0.0
    """If > 0, subtract an EMA (this decay) of the reward from each reward (variance reduction)."""
    causal_credit: bool = False
    """Credit step t's reward only to earlier steps' choices (the paper's r_accu includes r_k)."""
    init_p: float = 0.5
    """Every source row's weight p at the start (the sigmoid layer's bias is logit(init_p), within
    +-logit_clamp). The paper does not say; 0.5 (bias 0) is the plain initialisation. Near 1 the run
    starts where plain mixing (Mix) is, so a selector that learns nothing loses nothing."""
    influence_target: Literal["train_batch", "heldout_batch"] = "heldout_batch"
    influence_loss: Literal["bce", "pairwise"] = "pairwise"
    """influence mode: the target loss whose gradient scores the source rows. bce = the tower's
    loss; pairwise = mean log(1 + exp(-(f_pos - f_neg))) over the target batch's positive-negative
    pairs, an AUC surrogate blind to a shift of every logit, so a row is not scored for moving the
    calibration (which, under bce, dominates the first-order influence)."""
    influence_norm: Literal["scale", "per_label"] = "per_label"
    """influence mode: scale = divide by a running mean |influence|; per_label = also centre it
    within each label class first. A sample's first-order influence is dominated by its label
    (every negative moves the output bias the same way), which says nothing about harm."""
    influence_group: str = "item_id"
    """influence mode: the selector is trained on the decayed mean influence of the source rows
    sharing this source feature's id (single-id features: item_id, user_id, category, ...);
    "" = each row's own influence. cctl_rec/train/influence_groups.py."""
    influence_group_decay: float = 0.9
    """influence mode: per-sighting decay of the group means (0: this step's rows only)."""
    evidence_shift: Literal["none", "label", "margin"] = "label"
    """evidence mode: lower the source label the source over-represents relative to the target,
    w_y = (r_y / max r)^power, r_y = P_t(y) / P_s(y) (cctl_rec/train/evidence.py:LabelShift):
    label = every row of label y at w_y; margin = the same share 1 - w_y of label y dropped, taken
    from the rows the mixed network disagrees with most; none = off."""
    evidence_shift_power: float = 0.5
    """evidence mode: exponent of the label-shift weight (1: the full correction, 0.5: half of it in
    log space). 0.5 chosen on target *valid* AUC of the transfer benchmark's quick subset (5 seeds):
    on Amazon 5%, whose clean source rates higher than its target, the full correction lost 0.0007
    valid AUC to Mix and half 0.0003; with 30% of the labels flipped both gain (docs/selector.md)."""
    evidence_shift_z: float = 3.0
    """evidence mode (and the influence keep rate): the label-shift weights stay 1 until the source's
    click share differs from the target's by at least this many standard errors (two-proportion z
    test on the rows seen so far; 0 = always apply the shift). A difference sampling alone explains
    is no evidence of harm: on the four DisenCDR pairs both domains click at exactly 0.2000, yet the
    running shares of the first rows seen gave weights 0.993-0.9999, enough to decorrelate a chaotic
    sparse run from Mix (cloth <- electronic 5%: p 0.997, Mix - 0.0016 +- 0.0057 test AUC over 10
    seeds). With the gate those runs are Mix, bitwise (tests/test_evidence.py)."""
    evidence_groups: bool = False
    """evidence mode: also lower (label, margin) groups whose influence on a held-out target batch is
    significantly worse than target rows alike (EvidenceTable). Off: measured on real data with 30%
    flipped labels, a row's first-order influence ranks the flipped rows as the MOST helpful
    (harmful AUROC 0.18-0.22 for pairwise and BCE influence, docs/selector.md)."""
    evidence_decay: float = 0.98
    """evidence mode: per-step decay of the per-group influence statistics (~50-step memory)."""
    evidence_bins: tuple[float, ...] = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    """evidence mode: edges of the margin bins, margin = (2y - 1) * the mixed tower's logit on the
    source row (negative: the model disagrees with the row's label). Groups = label x bin."""
    evidence_reference: Literal["target", "zero"] = "target"
    """evidence mode: what a source group's mean influence is compared with. target: the mean
    influence of the step's own target rows of the same (label, margin) group — rows known to belong
    to the target, so a source group is lowered only when it does worse than target rows alike
    (each domain centred per label first). zero: its own label's mean (the source compared with
    itself: on clean data it lowers the below-average half; measured, docs/selector.md)."""
    evidence_t: float = 2.0
    """evidence mode: a group's weight drops below 1 only when its mean influence is below zero by
    more than this many standard errors."""
    evidence_strength: float = 2.0
    """evidence mode: weight of a harmful group = exp(strength * mean normalised influence)."""
    influence_keep: Optional[float] = None
    """influence mode: the mean p the selector is held to (a penalty 10 (mean p - keep)^2 per step;
    0 = none). The influence decides which source rows; this decides how much source. Without it
    the mean p drifts late in a run (to 0.999 on one seed, costing 0.016 AUC with no harmful rows).
    null (the default) = follows the data: the source's mean label-shift weight sum_y P_s(y) w_y
    (w_y as ``evidence_shift_power`` gives it, cctl_rec/train/evidence.py:LabelShift), updated every
    step — 1 where the source's label balance matches the target's (keep all of it, as Mix does),
    lower where the source over-represents a label (0.86 for a 20%-CTR target and a source of the same
    CTR with 30% of its labels flipped: P_s(1) = 0.38, w = (1, 0.64), power 0.5).
    A fixed value (the earlier default was 0.5) holds it there whatever the data."""

    @property
    def needs_influence(self) -> bool:
        """Whether the mode scores source rows by their influence on the target each step."""
        return self.mode == "influence" or (self.mode == "evidence" and self.evidence_groups)

    def __post_init__(self) -> None:
        _check(self.alpha >= 0, f"selector.alpha must be >= 0, got {self.alpha}")
        _check(0.0 <= self.gamma <= 1.0, f"selector.gamma must be in [0, 1], got {self.gamma}")
        _check(self.update_every >= 0, f"selector.update_every must be >= 0 (0: from the run's length), got "
                                       f"{self.update_every}")
        _check(self.lr > 0, f"selector.lr must be > 0, got {self.lr}")
        _check(0.0 < self.init_p < 1.0, f"selector.init_p must be in (0, 1), got {self.init_p}")
        _check(0.0 <= self.evidence_decay < 1.0, f"selector.evidence_decay must be in [0, 1), got {self.evidence_decay}")
        _check(len(self.evidence_bins) > 0 and all(a < b for a, b in zip(self.evidence_bins, self.evidence_bins[1:])),
               f"selector.evidence_bins must be increasing, got {list(self.evidence_bins)}")
        _check(0.0 < self.evidence_shift_power <= 1.0,
               f"selector.evidence_shift_power must be in (0, 1], got {self.evidence_shift_power}")
        _check(self.evidence_shift_z >= 0, f"selector.evidence_shift_z must be >= 0, got {self.evidence_shift_z}")
        _check(self.evidence_t >= 0, f"selector.evidence_t must be >= 0, got {self.evidence_t}")
        _check(self.evidence_strength > 0, f"selector.evidence_strength must be > 0, got {self.evidence_strength}")
        _check(self.influence_keep is None or 0.0 <= self.influence_keep < 1.0,
               f"selector.influence_keep must be null (follow the data) or in [0, 1), got {self.influence_keep}")
        _check(0.0 <= self.influence_group_decay < 1.0,
               f"selector.influence_group_decay must be in [0, 1), got {self.influence_group_decay}")
        _check(self.logit_clamp > 0, f"selector.logit_clamp must be > 0, got {self.logit_clamp}")
        _check(0.0 <= self.ema_baseline < 1.0, f"selector.ema_baseline must be in [0, 1), got {self.ema_baseline}")
        _check(all(h > 0 for h in self.hidden), f"selector.hidden widths must be > 0, got {list(self.hidden)}")


@dataclass(frozen=True, kw_only=True)
class SCNConfig:
    sync_every: int = 1000
    """k of §2.3.5: steps between two copies of the mixed network into the pure network."""
    sync_optimizer_state: bool = True
    """Copy the optimizer state (dense Adam moments, fused TBE Adagrad state) along with the weights."""
    reward_source: Literal["train_batch", "heldout_batch"] = "train_batch"
    """train_batch: Eq. 5 on the step's own target batch (the paper). heldout_batch: on a batch of
    the target valid split, scored by both towers (unbiased when data is revisited)."""

    def __post_init__(self) -> None:
        _check(self.sync_every > 0, f"scn.sync_every must be > 0, got {self.sync_every}")


@dataclass(frozen=True, kw_only=True)
class RENConfig:
    enabled: bool = True
    weight: float = 0.001
    """lambda_ren: weight of Eq. 12 in the mixed objective (the paper gives none). Measured on
    `tiny`: 0.1 and 0.01 cost target AUC (the id term pushes target ID embeddings away from
    the source ones); 0.001 is neutral to slightly positive (docs/results.md)."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, f"ren.weight must be >= 0, got {self.weight}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    dense_lr: float = 1e-3
    """Adam for towers and SAN (the paper's optimizer)."""
    sparse_lr: float = 0.05
    sparse_optimizer: Literal["exact_rowwise_adagrad", "exact_adagrad", "exact_sgd", "adam"] = "exact_rowwise_adagrad"
    """Fused into fbgemm's TBE. fbgemm's CPU TBE has no Adam: adam is for CUDA only."""

    def __post_init__(self) -> None:
        _check(self.dense_lr > 0, f"optim.dense_lr must be > 0, got {self.dense_lr}")
        _check(self.sparse_lr > 0, f"optim.sparse_lr must be > 0, got {self.sparse_lr}")


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    sharding: Literal["auto", "data_parallel", "table_wise", "column_wise", "table_column_wise",
                      "row_wise", "table_row_wise"] = "auto"
    """Restricts the planner to one sharding type (auto: the planner chooses among those the
    device supports). row_wise / table_row_wise need CUDA."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    seed: int = 0
    steps: int = 0
    """Stop after this many steps (0 = when the target train split is exhausted)."""
    log_every: int = 100
    eval_every: int = 0
    """Evaluate on target valid every N steps (0 = only at the end)."""
    max_eval_rows: int = 0
    """Evaluate on at most this many rows per split (0 = all)."""
    threads: int = 0
    """torch intra-op threads per rank (0 = leave torch's default)."""
    checkpoint_every: int = 0
    """Write a DCP checkpoint every N steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    keep_best: bool = False
    """Keep the checkpoint of the step with the best target valid AUC in RUN/best/ (needs
    run.eval_every; export / evaluate --checkpoint best read it)."""
    save_predictions: bool = False
    """Write the pure tower's target test logits (row order) to predictions-tgt-test.parquet."""
    resume: bool = True
    """Continue from the newest complete checkpoint in the run directory, if there is one."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16: the forward (tables' outputs stay fp32; towers and SAN run in bfloat16) under
    torch.autocast; the losses, the selector and its REINFORCE update, metrics and evaluation stay
    fp32. Measured speed and AUC per machine: docs/benchmarks/README.md."""

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2 ** 62, f"run.seed must be in [0, 2^62), got {self.seed}")
        _check(self.steps >= 0, f"run.steps must be >= 0, got {self.steps}")
        _check(self.max_eval_rows >= 0, f"run.max_eval_rows must be >= 0 (0: every row), got {self.max_eval_rows}")
        _check(0 <= self.threads <= 4096, f"run.threads must be in [0, 4096] (0: torch's default), got {self.threads}")
        _check(self.log_every > 0, f"run.log_every must be > 0, got {self.log_every}")
        _check(self.eval_every >= 0, f"run.eval_every must be >= 0, got {self.eval_every}")
        _check(self.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(not self.keep_best or self.eval_every > 0,
               "run.keep_best=true needs run.eval_every > 0 (the valid AUC it keeps the best of is measured "
               "every eval_every steps)")
        _check(self.precision in ("fp32", "bf16"), f"run.precision must be fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    scn: SCNConfig = field(default_factory=SCNConfig)
    ren: RENConfig = field(default_factory=RENConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check(not (self.model.name == "cctl" and self.data.src_ratio == 0),
               "model.name=cctl needs source rows (data.src_ratio > 0, got 0); for target only use model.name=dnn")
        _check(not (self.model.share_ids and self.ren.enabled and self.model.name == "cctl"),
               "model.share_ids=true leaves one ID table per entity, so REN has nothing to compare; "
               "set ren.enabled=false with it")


# ----------------------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    got = _short(value)  # what an error quotes: bounded whatever the value holds
    if origin is Literal:
        if not isinstance(value, (str, int, float, bool, type(None))) or value not in args:
            raise ValueError(f"{path} must be one of {list(args)}, got {got}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            elem = args[0]
            return tuple(_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value))
        raise TypeError(f"{path} must be a list, got {got} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{path} must be a mapping, got {got}")
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{path} must be true or false, got {got}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2 ** 63:
                raise ValueError(f"{path} must be a 64-bit integer, got {got}")
            return value
        raise TypeError(f"{path} must be an integer, got {got}")
    if tp is float:
        if isinstance(value, str) and len(value) < 64 and _SCI.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an integer beyond a float's range
                raise ValueError(f"{path} must be a finite number, got {got}") from None
            if not math.isfinite(value):
                raise ValueError(f"{path} must be a finite number, got {_short(value)}")
            return value
        raise TypeError(f"{path} must be a number, got {got}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{path} must be a string, got {got}")
    raise TypeError(f"{path}: unsupported config type {_type_name(tp)}")


def from_dict(cls: Any, d: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from ``d``; unknown keys and wrong types raise with their path."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            shown = path if len(path) <= 80 else path[:80] + "..."
            raise ValueError(f"unknown config key '{shown}'; valid: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def check_size(d: Any, where: str) -> None:
    """Raises ValueError when a loaded config expands to more than :data:`MAX_CONFIG_VALUES`
    values or :data:`MAX_CONFIG_CHARS` characters, or nests deeper than ``safe_io.MAX_DEPTH``;
    YAML aliases count at every use. Walks iteratively and stops at the first bound, so an alias
    bomb costs no more than the bound."""
    from cctl_rec.safe_io import MAX_DEPTH

    values = chars = 0
    stack = [(d, 1)]
    while stack:
        o, depth = stack.pop()
        values += 1
        if isinstance(o, str):
            chars += len(o)
        elif isinstance(o, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise ValueError(f"{where} nests deeper than {MAX_DEPTH} levels; expected a config of sections "
                                 f"and values")
            items = list(o.items()) if isinstance(o, dict) else None
            if items is not None:
                chars += sum(len(k) for k, _ in items if isinstance(k, str))
                stack.extend((v, depth + 1) for _, v in items)
            else:
                stack.extend((v, depth + 1) for v in o)
        if values > MAX_CONFIG_VALUES or chars > MAX_CONFIG_CHARS:
            raise ValueError(f"{where} expands to more than {MAX_CONFIG_VALUES:,} values or {MAX_CONFIG_CHARS:,} "
                             f"characters (YAML anchors and aliases are counted at every use); expected a config of "
                             f"at most that size")


def to_dict(cfg: Any) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ``a.b=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {_short(item)} must look like section.key=value")
        if len(item) > MAX_CONFIG_CHARS:
            raise ValueError(f"override {_short(item)} has {len(item):,} characters; expected at most "
                             f"{MAX_CONFIG_CHARS:,}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {_short(item)} has an empty key part")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {_short(item)}: '{_short(p)}' is not a section")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValueError(f"override {_short(item)}: the value is not plain YAML ({first}); expected a number, "
                             f"string, boolean or list") from None
        except RecursionError:
            raise ValueError(f"override {_short(item)}: the value nests too deeply; expected a number, string, "
                             f"boolean or list") from None
        check_size(value, f"override {_short(item)}")
        node[parts[-1]] = value
    return d


def load_yaml(path: Optional[str]) -> dict[str, Any]:
    """A config file as a dict: a regular file of at most :data:`MAX_CONFIG_BYTES`, UTF-8 YAML
    through ``yaml.safe_load``, a mapping at top level, within :func:`check_size`'s bounds."""
    if path is None:
        return {}
    from cctl_rec.safe_io import decode_text, read_bounded

    text = decode_text(read_bounded(path, MAX_CONFIG_BYTES, "config file"), f"config file {path}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"config file {path} is not valid YAML: {first}") from None
    except RecursionError:
        raise ValueError(f"config file {path} nests too deeply; expected a config of sections and values") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    check_size(data, f"config file {path}")
    return data


def load_config(path: Optional[str], overrides: Optional[list[str]] = None, cls: Any = TrainConfig) -> Any:
    """Loads a YAML config file (or the defaults when ``path`` is None) with overrides applied."""
    d = apply_overrides(load_yaml(path), list(overrides or []))
    check_size(d, f"config file {path}" if path else "the config")
    return from_dict(cls, d)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
