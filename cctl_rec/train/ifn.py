"""Training the IFN selector: the paper's REINFORCE and the analysis / influence modes.

Modes (``selector.mode``), each one row of :data:`MODES` (how the selector's p_i become Eq. 3's
source weights, and how the selector learns); a new mode is a new row:

- ``paper``: w_i = p_i (soft weights); REINFORCE on grad sum_i log p_i with r_accu (Eq. 9).
- ``bernoulli``: a_i ~ Bernoulli(p_i) is the weight; REINFORCE on the action log-likelihood (DVRL).
- ``fixed``: w_i = 1 (CCTL without IFN; the naive mix).
- ``oracle``: w_i = 1 - is_harmful_i (needs the ground truth; an upper bound for analysis).
- ``supervised``: the selector is fitted to 1 - is_harmful (a check that its inputs suffice).
- ``evidence``: the product default (not in the paper): every weight starts at 1 and drops only
  for groups of rows (label x margin bin) whose mean influence on a held-out target batch is
  significantly negative (:mod:`cctl_rec.train.evidence`). The selector network is not used.
- ``influence``: the selector follows a per-sample influence signal (not in the paper, see
  :func:`per_sample_influence`): a meta-gradient step of Learning-to-Reweight / Meta-Weight-Net
  form, grad_phi sum_i zbar_i p_i(phi) with zbar_i the normalised influence of sample i averaged
  over the rows sharing its item (:mod:`cctl_rec.train.influence_groups`), plus a penalty holding
  the mean p at the keep rate: ``selector.influence_keep``, or by default the source's mean
  label-shift weight (:meth:`IFN.keep_rate`), so the amount of source kept follows the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cctl_rec.config import SelectorConfig
from cctl_rec.distributed.env import allreduce_mean_
from cctl_rec.modules.selector import Selector
from cctl_rec.modules.tower import Tower
from cctl_rec.schema import DomainSchema
from cctl_rec.train.evidence import EvidenceTable, LabelShift
from cctl_rec.train.influence_groups import InfluenceGroups
from cctl_rec.train.reinforce import Reinforce, RewardShaper

logger = logging.getLogger(__name__)


KEEP_PENALTY = 10.0
"""Weight of (mean p - selector.influence_keep)^2 in the influence mode's selector loss."""


def update_every_for(cfg: SelectorConfig, total_steps: Optional[int]) -> int:
    """selector.update_every, or with 0 (auto) total_steps / 20 within [1, 1000]: ~20 updates in a
    short run, the paper's 1000 in a streaming run of 20k+ steps."""
    if cfg.update_every:
        return cfg.update_every
    if not total_steps:
        return 1000
    return max(1, min(1000, round(total_steps / 20)))


def _margins(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(2 y - 1) * logit, detached: > 0 where the network agrees with the row's label."""
    return (2.0 * labels.float() - 1.0) * logits.detach().float()


def _centre_per_label(influence: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Influence minus its mean within each label class: removes the part every negative (or
    positive) sample shares, which says how the label moves the whole tower, not whether the row
    is harmful (measured: uncentred, every label-0 row of a source looks helpful and every label-1
    row harmful, docs/selector.md)."""
    out = influence.clone()
    for y in (0.0, 1.0):
        m = labels == y
        if m.any():
            out[m] -= out[m].mean()
    return out


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def pairwise_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over (pos, neg) pairs of log(1 + exp(-(f_pos - f_neg))): B logits, B labels -> scalar.
    Zero (with a graph) when the batch lacks one of the classes."""
    pos, neg = logits[y > 0.5], logits[y <= 0.5]
    if pos.numel() == 0 or neg.numel() == 0:
        return logits.sum() * 0.0
    return F.softplus(neg.unsqueeze(0) - pos.unsqueeze(1)).mean()


def per_sample_influence(tower: nn.Module, x_src: torch.Tensor, y_src: torch.Tensor, x_eval: torch.Tensor,
                         y_eval: torch.Tensor, eval_loss: str = "bce") -> torch.Tensor:
    """First-order influence of each source sample on the target loss through one SGD step of the
    tower's dense parameters theta:

        infl_i = grad_theta L(y_i^s, f(x_i^s)) . grad_theta L_eval        (B_s values)

    with L_eval the target batch's BCE (``eval_loss="bce"``) or its pairwise ranking loss
    (``"pairwise"``, :func:`pairwise_loss`); positive when a step on sample i lowers the target
    loss. No loop over samples: for an MLP tower (Linear / ReLU layers, the SCN tower) each
    Linear's share is exact and cheap, delta_i^T G a_i with a_i the layer's input, delta_i its
    output gradient for sample i (one ordinary backward of sum_i l_i gives every delta_i) and G
    the layer's L_eval gradient (:func:`_mlp_influence`); any other head goes through the
    double-backward trick (:func:`_influence_double_backward`). Inputs are detached: the
    lookahead covers the dense tower only, not the embedding tables.

    Args:
        tower: the mixed tower (B X W -> B logits).
        x_src: B_s X W aligned source rows; y_src: B_s labels.
        x_eval: B_e X W target rows; y_eval: B_e labels.
    """
    # The output bias is left out: its gradient is the batch's calibration error, shared by every
    # sample of a label, and it swamps the per-sample signal (tests/test_equations.py pins the rest).
    last = _last_bias(tower)
    params = [p for n, p in tower.named_parameters() if p.requires_grad and n != last]
    with torch.enable_grad():
        f_eval = tower(x_eval.detach())
        if eval_loss == "pairwise":
            l_eval = pairwise_loss(f_eval, y_eval)
        else:
            l_eval = F.binary_cross_entropy_with_logits(f_eval, y_eval)
        g_eval = torch.autograd.grad(l_eval, params)
        seq = _mlp_sequence(tower)
        if seq is not None:
            return _mlp_influence(seq, x_src.detach(), y_src, dict(zip(params, g_eval)))
        return _influence_double_backward(tower, params, list(g_eval), x_src.detach(), y_src)


def _mlp_sequence(tower: nn.Module) -> Optional[nn.Sequential]:
    """The tower's layer stack if it is a plain MLP (only Linear and ReLU), else None."""
    net = getattr(tower, "net", None)
    if isinstance(tower, Tower) and isinstance(net, nn.Sequential) and all(
            isinstance(m, (nn.Linear, nn.ReLU)) for m in net):
        return net
    return None


def _mlp_influence(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                   g_eval: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """sum over Linear layers l of (delta_l G_W_l) . a_l + delta_l . g_b_l per row: B values
    (``g_eval``: parameter -> its L_eval gradient; a parameter left out, the output bias,
    contributes nothing). The per-row gradient of a Linear's weight is the outer product
    delta_i a_i^T, so its dot with G_W is delta_i^T G_W a_i: one matmul per layer for the batch."""
    layers, a = [], x                                      # (Linear, its input, its output)
    for m in net:
        out = m(a)
        if isinstance(m, nn.Linear):
            layers.append((m, a, out))
        a = out
    loss = F.binary_cross_entropy_with_logits(a.squeeze(-1), y, reduction="sum")   # sum: delta_i per row
    deltas = torch.autograd.grad(loss, [out for _, _, out in layers])
    infl = torch.zeros(x.shape[0], dtype=x.dtype)
    for (m, a_in, _), d in zip(layers, deltas):
        if m.weight in g_eval:
            infl += ((d @ g_eval[m.weight]) * a_in.detach()).sum(1)
        if m.bias is not None and m.bias in g_eval:
            infl += d @ g_eval[m.bias]
    return infl.detach()


def _influence_double_backward(tower: nn.Module, params: list[torch.Tensor], g_eval: list[torch.Tensor],
                               x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """With per-sample weights eps (zeros), infl = d/d eps [ grad_theta(sum_i eps_i l_i) . g_eval ]."""
    eps = torch.zeros(x.shape[0], dtype=x.dtype, requires_grad=True)
    l_src = F.binary_cross_entropy_with_logits(tower(x), y, reduction="none")
    g_src = torch.autograd.grad((eps * l_src).sum(), params, create_graph=True, allow_unused=True)
    dot = sum((a * b).sum() for a, b in zip(g_src, g_eval) if a is not None)
    (infl,) = torch.autograd.grad(dot, eps)
    return infl.detach()


def _last_bias(tower: nn.Module) -> str:
    names = [n for n, _ in tower.named_parameters() if n.endswith("bias")]
    return names[-1] if names else ""


class IFN:
    """The selector and its training rule.

    Args:
        cfg: selector settings.
        in_dim: width of the SAN-aligned source representation.
        source: the source schema (the influence mode's group feature is one of its columns).
        total_steps: the run's length (resolves ``selector.update_every=0``).
    """

    def __init__(self, cfg: SelectorConfig, in_dim: int, source: Optional[DomainSchema] = None,
                 total_steps: Optional[int] = None) -> None:
        self.cfg = cfg
        self.update_every = update_every_for(cfg, total_steps)
        self.selector = Selector(in_dim, cfg.hidden, cfg.logit_clamp, cfg.init_p)
        if _world() > 1:  # one selector: identical on every rank
            for p in self.selector.parameters():
                dist.broadcast(p.data, src=0)
        self.params = list(self.selector.parameters())
        self.rl: Optional[Reinforce] = None
        self.opt: Optional[torch.optim.Optimizer] = None
        learner = MODES[cfg.mode].learner
        if learner == "reinforce":
            self.rl = Reinforce(self.params, cfg.alpha, cfg.gamma, self.update_every, cfg.causal_credit)
        elif learner == "adam":
            self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.shaper = RewardShaper(cfg.ema_baseline, cfg.reward_norm)
        self.infl_scale: Optional[float] = None
        self.groups: Optional[InfluenceGroups] = None
        if cfg.mode == "influence" and cfg.influence_group:
            if source is None:
                raise ValueError("selector.influence_group needs the source schema (IFN(..., source=))")
            self.groups = InfluenceGroups.of(source, cfg.influence_group, cfg.influence_group_decay)
        self.evidence: Optional[EvidenceTable] = None
        self.label_shift: Optional[LabelShift] = None
        if cfg.mode == "evidence" and cfg.evidence_shift != "none":
            self.label_shift = LabelShift(cfg.evidence_shift, cfg.evidence_shift_power, cfg.evidence_shift_z)
        elif cfg.mode == "influence" and cfg.influence_keep is None:  # the keep rate follows the data
            self.label_shift = LabelShift("label", cfg.evidence_shift_power, cfg.evidence_shift_z)
        if cfg.mode == "evidence" and cfg.evidence_groups:
            self.evidence = EvidenceTable(cfg.evidence_bins, cfg.evidence_decay, cfg.evidence_t, cfg.evidence_strength,
                                          reference=cfg.evidence_reference == "target")

    @property
    def needs_influence(self) -> bool:
        return self.cfg.needs_influence

    def keep_rate(self) -> float:
        """influence mode: the mean p the selector is held to. ``selector.influence_keep`` if set,
        else the source's mean label-shift weight sum_y P_s(y) w_y over the rows seen so far (every
        rank's): 1 while the source's label balance matches the target's, lower where the source
        over-represents a label (1 before both domains have shown both labels)."""
        if self.cfg.influence_keep is not None:
            return self.cfg.influence_keep
        assert self.label_shift is not None
        c_src = self.label_shift.counts[0]
        if float(c_src.sum()) == 0:
            return 1.0
        return float((c_src / c_src.sum() * self.label_shift.label_weights()).sum())

    def evidence_groups(self, labels: torch.Tensor, logit_src: torch.Tensor) -> torch.Tensor:
        """evidence mode: B_s group ids from the labels and the mixed tower's source logits."""
        assert self.evidence is not None
        return self.evidence.groups(labels, _margins(labels, logit_src))

    def select(self, x_src: torch.Tensor, harmful: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
               logit_src: Optional[torch.Tensor] = None) -> "Selection":
        """The selector on B_s rows: its logits and p (with graph), once per step, and the mode's
        weights for Eq. 3 (``labels`` and ``logit_src``, the mixed tower's logits on the rows:
        evidence mode)."""
        logits = self.selector.logits(x_src.detach())
        p = torch.sigmoid(logits)
        w, actions = MODES[self.cfg.mode].weights(self, p, SourceRows(harmful=harmful, labels=labels,
                                                                       logit_src=logit_src))
        return Selection(w, logits, p, actions)

    def weights(self, x_src: torch.Tensor, harmful: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
                logit_src: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(weights for Eq. 3, the selector's logits with graph, actions or None) for B_s rows:
        :meth:`select` as a tuple."""
        sel = self.select(x_src, harmful, labels, logit_src)
        return sel.weights, sel.logits, sel.actions

    def evidence_weights(self, labels: torch.Tensor, logit_src: torch.Tensor) -> torch.Tensor:
        """evidence mode: B_s weights, the label-shift weight times the group weight (each 1 when off)."""
        w = torch.ones(labels.shape[0])
        if self.label_shift is not None:
            w = w * self.label_shift.weights(labels, _margins(labels, logit_src))
        if self.evidence is not None:
            w = w * self.evidence.weights(self.evidence_groups(labels, logit_src))
        return w

    def step(self, step: int, logits: torch.Tensor, reward: float, actions: Optional[torch.Tensor],
             harmful: Optional[torch.Tensor], influence: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None,
             logit_src: Optional[torch.Tensor] = None, tgt_labels: Optional[torch.Tensor] = None,
             logit_tgt: Optional[torch.Tensor] = None, p: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Trains the selector after one SCN step (the mode's ``learn``); returns what it logs.
        ``group_ids``: B_s ids of ``selector.influence_group`` (influence mode with groups);
        ``logit_src``: the mixed tower's B_s source logits, and with
        ``selector.evidence_reference=target`` ``influence`` holds B_s + B_t values, the step's target
        rows last, with their ``tgt_labels`` and ``logit_tgt`` (evidence mode); ``p``: sigmoid(logits)
        with graph when the caller has it (:meth:`select`), else computed here."""
        learn = MODES[self.cfg.mode].learn
        if learn is None:
            return {}
        return learn(self, step, SourceRows(logits=logits, reward=reward, actions=actions, harmful=harmful,
                                            influence=influence, labels=labels, group_ids=group_ids,
                                            logit_src=logit_src, tgt_labels=tgt_labels, logit_tgt=logit_tgt, p=p))

    def _normalise(self, influence: torch.Tensor) -> torch.Tensor:
        """influence / its running mean magnitude, clipped to [-5, 5] (the scale is averaged over
        ranks: every rank keeps the same running scale, so a resumed run, which restores rank 0's,
        continues exactly)."""
        scale_t = influence.abs().mean().reshape(1).float()
        allreduce_mean_([scale_t])
        scale = float(scale_t) + 1e-12
        self.infl_scale = scale if self.infl_scale is None else 0.99 * self.infl_scale + 0.01 * scale
        return (influence / self.infl_scale).clamp(-5, 5)

    def _apply(self, loss: torch.Tensor) -> None:
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=False)
        grads = torch.autograd.grad(loss, self.params)
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        allreduce_mean_([p.grad for p in self.params])
        self.opt.step()

    def meta(self) -> dict:
        """The non-tensor state (for trainer.json)."""
        return {"n": self.rl.n if self.rl else 0.0, "updates": self.rl.updates if self.rl else 0,
                "shaper": self.shaper.state_dict(), "infl_scale": self.infl_scale}

    def load_meta(self, m: dict) -> None:
        if self.rl:
            self.rl.n, self.rl.updates = float(m["n"]), int(m["updates"])
        self.shaper.load_state_dict(m["shaper"])
        self.infl_scale = m["infl_scale"]


# ----------------------------------------------------------------------------- the modes


@dataclass
class SourceRows:
    """What one step gives the mode about its B_s source rows (None where the caller has not it).

    Attributes:
        logits, p: the selector's B_s logits and sigmoid(logits), with graph.
        reward: the step's rank-averaged reward (Eq. 5); actions: the Bernoulli draws.
        harmful, labels, logit_src: B_s ground-truth flags, labels, mixed-tower logits.
        influence, group_ids: the influence signal (B_s, or B_s + B_t), the rows' group ids.
        tgt_labels, logit_tgt: the step's B_t target labels and mixed-tower logits.
    """

    logits: Optional[torch.Tensor] = None
    p: Optional[torch.Tensor] = None
    reward: float = 0.0
    actions: Optional[torch.Tensor] = None
    harmful: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    logit_src: Optional[torch.Tensor] = None
    influence: Optional[torch.Tensor] = None
    group_ids: Optional[torch.Tensor] = None
    tgt_labels: Optional[torch.Tensor] = None
    logit_tgt: Optional[torch.Tensor] = None


@dataclass
class Selection:
    """The selector's verdict on a step's B_s source rows (:meth:`IFN.select`).

    Attributes:
        weights: B_s weights for Eq. 3 (the mode's: p_i, a_i, 1, 1 - harmful_i, ...), detached.
        logits, p: the selector's B_s logits and p_i = sigmoid(logits), with graph.
        actions: B_s Bernoulli draws (bernoulli mode), else None.
    """

    weights: torch.Tensor
    logits: torch.Tensor
    p: torch.Tensor
    actions: Optional[torch.Tensor] = None


Weights = Callable[[IFN, torch.Tensor, SourceRows], tuple[torch.Tensor, Optional[torch.Tensor]]]
Learn = Callable[[IFN, int, SourceRows], dict[str, float]]


@dataclass(frozen=True)
class Mode:
    """One ``selector.mode``.

    Attributes:
        weights: (ifn, p, rows) -> (B_s weights for Eq. 3, actions or None).
        learn: (ifn, step, rows) -> what the step logs, after training the selector; None: it
            does not learn.
        learner: the selector's optimizer: "reinforce" (Eq. 9, :class:`Reinforce`), "adam" or None.
        logs_weights: the logged p (``p_mean``, the p histogram) is the weight, not the selector's
            p (its network is not used).
    """

    weights: Weights
    learn: Optional[Learn] = None
    learner: Optional[str] = None
    logs_weights: bool = False


def _soft(ifn: IFN, p: torch.Tensor, rows: SourceRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """w_i = p_i."""
    return p.detach(), None


def _ones(ifn: IFN, p: torch.Tensor, rows: SourceRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """w_i = 1: every source row counts (the naive mix)."""
    return torch.ones_like(p), None


def _paper_weights(ifn: IFN, p: torch.Tensor, rows: SourceRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """w_i = p_i; with alpha = 0 every w_i = 1: plain multi-domain training (§3.5)."""
    return _ones(ifn, p, rows) if ifn.cfg.alpha == 0 else _soft(ifn, p, rows)


def _bernoulli_weights(ifn: IFN, p: torch.Tensor, rows: SourceRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """w_i = a_i ~ Bernoulli(p_i) (the actions); with alpha = 0 every w_i = 1."""
    if ifn.cfg.alpha == 0:
        return _ones(ifn, p, rows)
    a = torch.bernoulli(p.detach())
    return a, a


def _oracle_weights(ifn: IFN, p: torch.Tensor, rows: SourceRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """w_i = 1 - is_harmful_i."""
    if rows.harmful is None:
        raise ValueError("selector.mode=oracle needs the is_harmful column in the source data")
    return (~rows.harmful).to(p.dtype), None


def _evidence_weights(ifn: IFN, p: torch.Tensor, rows: SourceRows) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """w_i = the label-shift weight times the evidence group's weight (:meth:`IFN.evidence_weights`)."""
    if rows.labels is None or rows.logit_src is None:
        raise ValueError("selector.mode=evidence needs the source labels and the mixed tower's source logits")
    return ifn.evidence_weights(rows.labels, rows.logit_src), None


def _reinforce(ifn: IFN, step: int, s: torch.Tensor, rows: SourceRows) -> dict[str, float]:
    """Eq. 9's bookkeeping for one step: grad of ``s`` (the step's log-likelihood of its choices)
    with the shaped reward into the eligibility trace; the update every ``update_every`` steps."""
    assert ifn.rl is not None and rows.logits is not None
    out: dict[str, float] = {}
    grads = torch.autograd.grad(s, ifn.params)
    r = ifn.shaper(rows.reward)
    ifn.rl.observe(list(grads), r, rows.logits.numel())
    out["reward_shaped"] = r
    if ifn.rl.maybe_update(step):
        out["selector_update"] = 1.0
    return out


def _learn_paper(ifn: IFN, step: int, rows: SourceRows) -> dict[str, float]:
    """REINFORCE on sum_i log p_i (Eq. 9)."""
    logits = rows.logits
    assert logits is not None
    s = F.logsigmoid(logits).sum()                                     # sum_i log p_i
    return _reinforce(ifn, step, s, rows)


def _learn_bernoulli(ifn: IFN, step: int, rows: SourceRows) -> dict[str, float]:
    """REINFORCE on the actions' log-likelihood sum_i a_i log p_i + (1 - a_i) log(1 - p_i) (DVRL)."""
    logits, actions = rows.logits, rows.actions
    assert logits is not None and actions is not None
    s = (actions * F.logsigmoid(logits) + (1 - actions) * F.logsigmoid(-logits)).sum()
    return _reinforce(ifn, step, s, rows)


def _learn_supervised(ifn: IFN, step: int, rows: SourceRows) -> dict[str, float]:
    """The selector fitted to 1 - is_harmful (BCE)."""
    assert ifn.opt is not None and rows.logits is not None
    if rows.harmful is None:
        raise ValueError("selector.mode=supervised needs the is_harmful column in the source data")
    loss = F.binary_cross_entropy_with_logits(rows.logits, (~rows.harmful).to(rows.logits.dtype))
    ifn._apply(loss)
    return {"selector_loss": float(loss)}


def _learn_evidence(ifn: IFN, step: int, rows: SourceRows) -> dict[str, float]:
    """The label-shift counts, then the evidence table's groups from the step's influence."""
    labels, logit_src, influence = rows.labels, rows.logit_src, rows.influence
    assert labels is not None
    out: dict[str, float] = {}
    if ifn.label_shift is not None:
        assert rows.tgt_labels is not None
        ifn.label_shift.update(labels, rows.tgt_labels, _margins(labels, logit_src) if logit_src is not None else None)
        w0, w1 = ifn.label_shift.label_weights().tolist()
        out.update(label_weight_0=w0, label_weight_1=w1)
    if ifn.evidence is None:
        return out
    assert influence is not None and logit_src is not None
    n_s = labels.numel()
    infl_s, infl_t = influence[:n_s], influence[n_s:]
    if ifn.cfg.influence_norm == "per_label":
        infl_s = _centre_per_label(infl_s, labels)
    z = ifn._normalise(infl_s)
    ifn.evidence.update(ifn.evidence_groups(labels, logit_src), z)
    if infl_t.numel():  # the target rows' reference, centred on its own and on the source's scale
        tgt_labels, logit_tgt = rows.tgt_labels, rows.logit_tgt
        assert tgt_labels is not None and logit_tgt is not None
        if ifn.cfg.influence_norm == "per_label":
            infl_t = _centre_per_label(infl_t, tgt_labels)
        z_t = (infl_t / (ifn.infl_scale or 1.0)).clamp(-5, 5)
        ifn.evidence.update(ifn.evidence_groups(tgt_labels, logit_tgt), z_t, reference=True)
    out["influence_pos_frac"] = float((infl_s > 0).float().mean())
    return out


def _learn_influence(ifn: IFN, step: int, rows: SourceRows) -> dict[str, float]:
    """A meta-gradient step: p_i up where the (normalised, grouped) influence is positive, the mean
    p held at the keep rate."""
    influence, labels, logits = rows.influence, rows.labels, rows.logits
    assert ifn.opt is not None and influence is not None and labels is not None and logits is not None
    if ifn.cfg.influence_norm == "per_label":
        influence = _centre_per_label(influence, labels)
    z = ifn._normalise(influence)  # the step does not depend on the loss scale
    if ifn.groups is not None:
        assert rows.group_ids is not None
        z = ifn.groups(rows.group_ids, z)
    p = rows.p if rows.p is not None else torch.sigmoid(logits)
    loss = -(z * p).mean()
    if ifn.label_shift is not None:
        assert rows.tgt_labels is not None
        ifn.label_shift.update(labels, rows.tgt_labels)
    keep = ifn.keep_rate()
    if keep > 0:
        # the influence ranks the rows; the source budget (mean p) is held, as L2RW
        # normalises its weights: left free, it drifts with the selector's inputs
        loss = loss + KEEP_PENALTY * (p.mean() - keep) ** 2
    ifn._apply(loss)
    return {"influence_pos_frac": float((influence > 0).float().mean()), "influence_keep": keep}


MODES: dict[str, Mode] = {
    "paper": Mode(_paper_weights, _learn_paper, "reinforce"),
    "bernoulli": Mode(_bernoulli_weights, _learn_bernoulli, "reinforce"),
    "fixed": Mode(_ones),
    "oracle": Mode(_oracle_weights),
    "supervised": Mode(_soft, _learn_supervised, "adam"),
    "evidence": Mode(_evidence_weights, _learn_evidence, logs_weights=True),
    "influence": Mode(_soft, _learn_influence, "adam"),
}
"""``selector.mode`` -> its weights and its learning rule (the module docstring says what each is)."""
