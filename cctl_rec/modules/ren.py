"""REN, the representation enhancement network (§2.5, Eq. 10-12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty, keeping the graph)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def ren_loss(id_s: torch.Tensor, id_t: torch.Tensor, id_mask: torch.Tensor,
             seq_s: torch.Tensor, seq_t: torch.Tensor, seq_mask: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss_ren = sim(v_id^s, v_id^t) - sim(v_seq^s, v_seq^t) (Eq. 12), cosine similarity (Eq. 11).

    Args:
        id_s, id_t: N X D embeddings of the same ids in the source and target ID tables.
        id_mask: N bools: the entity exists in both domains.
        seq_s, seq_t: B X D mean-pooled behaviour sequences of the same users in each domain.
        seq_mask: B bools: both sequences are non-empty.

    Returns:
        (loss, mean id cosine, mean sequence cosine); each mean is over its mask.
    """
    cos_id = masked_mean(F.cosine_similarity(id_s, id_t, dim=-1, eps=1e-8), id_mask)
    cos_seq = masked_mean(F.cosine_similarity(seq_s, seq_t, dim=-1, eps=1e-8), seq_mask)
    return cos_id - cos_seq, cos_id, cos_seq
