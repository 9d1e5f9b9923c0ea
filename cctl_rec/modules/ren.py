"""REN, the representation enhancement network (§2.5, Eq. 10-12)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty, keeping the graph); ``count``: the
    denominator to use instead of the mask's own count (see :func:`global_counts`)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / (m.sum().clamp_min(1.0) if count is None else count)


def global_counts(*masks: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-rank denominators that make masked means global: each mask's count summed over the
    ranks (at least 1), divided by the world size; None on one process.

    The ranks' losses are averaged (DDP averages their gradients, the logs all-reduce their
    means), so a per-rank masked mean weighs the rows of a rank with few masked rows more than
    one rank holding every row would: 1 and 2 ranks on the same global batches drifted apart
    (calibration 1.1920 vs 1.1905 after 16 steps on the test data). With these denominators the
    average over ranks is the mean over the global batch. One all-reduce of ``len(masks)`` numbers:
    a collective, every rank calls it.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    n = torch.stack([m.sum() for m in masks]).to(torch.float64)
    dist.all_reduce(n)
    return n.clamp_min(1.0) / dist.get_world_size()


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
        (loss, mean id cosine, mean sequence cosine); each mean is over its mask, over the
        global batch under torch.distributed (:func:`global_counts`: a collective).
    """
    n = global_counts(id_mask, seq_mask)
    cos_id = masked_mean(F.cosine_similarity(id_s, id_t, dim=-1, eps=1e-8), id_mask,
                         None if n is None else n[0].to(id_s.dtype))
    cos_seq = masked_mean(F.cosine_similarity(seq_s, seq_t, dim=-1, eps=1e-8), seq_mask,
                          None if n is None else n[1].to(seq_s.dtype))
    return cos_id - cos_seq, cos_id, cos_seq
