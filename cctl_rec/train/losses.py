"""SCN objectives (Eq. 3, 4), the reward (Eq. 5) and REN (Eq. 12) from one forward's output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from cctl_rec.data.batch import CCTLBatch
from cctl_rec.models.cctl import CCTLOutput
from cctl_rec.modules.ren import ren_loss
from cctl_rec.train.reward import eq5


@dataclass
class SCNLosses:
    """Attributes:
        mixed: Loss_src + Loss_tgt + lambda * Loss_ren (trains the mixed network, SAN, tables).
        pure: Loss_pure (trains the pure network).
        tgt, src, ren: the parts of ``mixed``.
        reward: Eq. 5, Loss_pure - Loss_tgt on the same target rows, detached.
        src_per_sample: B_s unweighted source losses (detached), for analysis.
    """

    mixed: torch.Tensor
    pure: torch.Tensor
    tgt: torch.Tensor
    src: torch.Tensor
    ren: torch.Tensor
    reward: torch.Tensor
    cos_id: torch.Tensor
    cos_seq: torch.Tensor


def _reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    return x.sum() if how == "sum" else x.mean()


REN = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""REN's (Loss_ren, cos_id, cos_seq) of one forward."""


def ren_terms(out: CCTLOutput, batch: CCTLBatch) -> Optional[REN]:
    """Eq. 12 on the forward's REN lookups: (Loss_ren, cos_id, cos_seq), or None without REN."""
    if out.ren_id_s is None:
        return None
    id_mask = torch.cat([batch.user_in_other, batch.item_in_other])
    return ren_loss(out.ren_id_s, out.ren_id_t, id_mask, out.ren_seq_s, out.ren_seq_t, batch.seq_mask)


def scn_losses(out: CCTLOutput, batch: CCTLBatch, weights: Optional[torch.Tensor], reduction: str = "mean",
               ren_weight: float = 0.0, dann_weight: float = 0.0, tgt_weight: float = 1.0,
               ren: Optional[REN] = None) -> SCNLosses:
    """Eq. 3: Loss_mixed = sum_i p_i L(y_i^s, f(x_i)) + sum_j L(y_j^t, f(x_j)) (+ lambda Loss_ren);
    Eq. 4: Loss_pure on the same target rows; Eq. 5: r = Loss_pure - Loss_tgt.

    ``weights`` (the selector's p_i, or actions a_i) are detached here: the tower loss must
    never train the selector (it would drive every p_i to 0). With ``reduction="mean"`` each
    domain's sum is divided by its row count. ``ren``: :func:`ren_terms` of ``out`` when the
    caller computed them already (the trainer times them on their own), else computed here.
    """
    y = batch.tgt_label
    pure = _reduce(F.binary_cross_entropy_with_logits(out.logit_pure, y, reduction="none"), reduction)
    zero = out.logit_pure.new_zeros(())
    if out.logit_tgt is None:  # target-only model
        return SCNLosses(mixed=zero, pure=pure, tgt=zero, src=zero, ren=zero, reward=zero,
                         cos_id=zero, cos_seq=zero)
    tgt = _reduce(F.binary_cross_entropy_with_logits(out.logit_tgt, y, reduction="none"), reduction)
    src = zero
    if out.logit_src is not None and out.logit_src.numel():
        l_src = F.binary_cross_entropy_with_logits(out.logit_src, batch.src_label, reduction="none")
        w = torch.ones_like(l_src) if weights is None else weights.detach()
        src = _reduce(w * l_src, reduction)
    if ren is None:
        ren = ren_terms(out, batch)
    ren_l, cos_id, cos_seq = ren if ren is not None else (zero, zero, zero)
    mixed = src + (tgt_weight * tgt if tgt_weight != 1.0 else tgt) + (ren_weight * ren_l if ren_weight else zero)
    if dann_weight and out.logit_domain is not None:  # DANN baseline: source rows are domain 1
        n_t = out.logit_tgt.shape[0]
        dom = torch.cat([torch.zeros(n_t), torch.ones(out.logit_domain.shape[0] - n_t)]).to(out.logit_domain)
        mixed = mixed + dann_weight * F.binary_cross_entropy_with_logits(out.logit_domain, dom)
    return SCNLosses(mixed=mixed, pure=pure, tgt=tgt, src=src, ren=ren_l,
                     reward=eq5(pure, tgt), cos_id=cos_id.detach(), cos_seq=cos_seq.detach())
