"""Heads that read the user's behaviour sequences besides the pooled fields: DIN and MiNet.

Both map the tower input x (B X (F * D): the pooled field embeddings in token order, see
:meth:`~cctl_rec.schema.DomainSchema.field_names`) plus per-position sequence embeddings to B
logits. ``fields`` gives each field's index in x. Sequences come as B X L X D embeddings looked
up in the target item table (the candidate's table) and a B X L bool mask.
"""

from __future__ import annotations

import torch
from torch import nn

from cctl_rec.modules.attention import InterestAttention, ItemAttention, TargetAttention
from cctl_rec.modules.tower import Tower


def _field_index(fields: dict[str, int], need: tuple[str, ...], head: str) -> list[int]:
    missing = [n for n in need if n not in fields]
    if missing:
        raise ValueError(f"model.head={head} needs the target features {list(need)}; the schema lacks {missing}")
    return [fields[n] for n in need]


def _replace(v: torch.Tensor, by: dict[int, torch.Tensor]) -> torch.Tensor:
    """B X F X D with field f replaced by ``by[f]`` (B X D)."""
    return torch.stack([by[f] if f in by else v[:, f] for f in range(v.shape[1])], dim=1)


class DINHead(nn.Module):
    """DIN (Zhou et al., 2018): B X (F * D) + the target behaviour sequence -> B logits.

    The candidate item (field ``item_id``) queries the sequence through :class:`TargetAttention`;
    the attention-pooled interest replaces the mean-pooled ``seq`` field, and the SCN tower
    (same widths as the DNN) reads the result.

    Args:
        in_dim: F * D.
        dim: D.
        hidden: the tower's hidden widths.
        fields: field name -> index in x (needs ``item_id`` and ``seq``).

    Inputs:
        x: B X (F * D); seq: B X L X D; mask: B X L bool.

    Example::

        head = DINHead(4 * 8, 8, (32,), {"user_id": 0, "seq": 1, "item_id": 2, "context": 3})
        logits = head(x, seq, mask)  # B
    """

    def __init__(self, in_dim: int, dim: int, hidden: tuple[int, ...], fields: dict[str, int]) -> None:
        super().__init__()
        self.dim = dim
        self.item, self.seq = _field_index(fields, ("item_id", "seq"), "din")
        self.attention = TargetAttention(dim)
        self.tower = Tower(in_dim, hidden)

    def forward(self, x: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        v = x.view(x.shape[0], -1, self.dim)                                  # B X F X D
        interest = self.attention(seq, v[:, self.item], mask)                 # B X D
        return self.tower(_replace(v, {self.seq: interest}).flatten(1))


class MiNetHead(nn.Module):
    """MiNet (Ouyang et al., 2020) over the target rows: B X (F * D) + both behaviour sequences -> B logits.

    Three interests: long-term p_u (the ``user_id`` field), short-term in the source domain
    (:class:`ItemAttention` with a transfer matrix over ``other_seq``, the user's recent source
    items) and short-term in the target domain (:class:`ItemAttention` over ``seq``), both queried
    by the candidate q (``item_id``) and the user; :class:`InterestAttention` weights each. The
    weighted long-term and target interests replace the ``user_id`` and ``seq`` fields, the weighted
    source interest is appended, and the SCN tower reads the B X (F * D + D) result.

    Args:
        in_dim: F * D.
        dim: D.
        hidden: the tower's hidden widths.
        fields: field name -> index in x (needs ``user_id``, ``item_id`` and ``seq``).

    Inputs:
        x: B X (F * D); seq, other: B X L X D (target / source sequence); seq_mask, other_mask: B X L bool.
    """

    def __init__(self, in_dim: int, dim: int, hidden: tuple[int, ...], fields: dict[str, int]) -> None:
        super().__init__()
        self.dim = dim
        self.user, self.item, self.seq = _field_index(fields, ("user_id", "item_id", "seq"), "minet")
        self.src_items = ItemAttention(dim, transfer=True)
        self.tgt_items = ItemAttention(dim)
        self.interests = InterestAttention(dim, 3)
        self.tower = Tower(in_dim + dim, hidden)

    def forward(self, x: torch.Tensor, seq: torch.Tensor, seq_mask: torch.Tensor, other: torch.Tensor,
                other_mask: torch.Tensor) -> torch.Tensor:
        v = x.view(x.shape[0], -1, self.dim)                                  # B X F X D
        q, p = v[:, self.item], v[:, self.user]
        s_src = self.src_items(other, q, p, other_mask)                       # B X D
        s_tgt = self.tgt_items(seq, q, p, seq_mask)                           # B X D
        z = self.interests(torch.stack([p, s_src, s_tgt], dim=1), q, p)       # B X 3 X D, weighted
        fields = _replace(v, {self.user: z[:, 0], self.seq: z[:, 2]}).flatten(1)
        return self.tower(torch.cat([fields, z[:, 1]], dim=1))
