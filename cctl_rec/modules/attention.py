"""Attention over a behaviour sequence: DIN's target attention and MiNet's two attention levels.

Shape letters: B batch, L sequence positions, D embedding dim, K interests. A sequence arrives as
``keys`` B X L X D (one embedding per position, from the same item table as the candidate) and a
``mask`` B X L bool (True: a real item; False: padding past the row's length). Padding never
changes an output: it is excluded by the mask, whatever its embedding holds.
"""

from __future__ import annotations

import torch
from torch import nn

from cctl_rec.modules.tower import mlp


class TargetAttention(nn.Module):
    """DIN's local activation unit and weighted sum pooling (Zhou et al., 2018).

    w_j = MLP([e_j, e_c, e_j - e_c, e_j * e_c]) for each behaviour e_j and the candidate e_c;
    interest = sum_j mask_j * w_j * e_j. As in DIN the weights are not normalised (no softmax),
    so the pooled vector keeps how strongly the history relates to the candidate. The MLP is
    Linear -> PReLU per hidden width (DIN's choice beside Dice), then Linear to one weight.

    Args:
        dim: D.
        hidden: hidden widths of the activation unit (DIN: 36).

    Example::

        att = TargetAttention(8)
        v = att(torch.randn(4, 20, 8), torch.randn(4, 8), torch.ones(4, 20, dtype=torch.bool))  # 4 X 8
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (36,)) -> None:
        super().__init__()
        if dim <= 0 or not all(h > 0 for h in hidden):
            raise ValueError(f"TargetAttention needs dim > 0 and hidden widths > 0, got {dim}, {list(hidden)}")
        layers: list[nn.Module] = []
        d = 4 * dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.PReLU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.unit = nn.Sequential(*layers)

    def weights(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """w_j before masking: keys B X L X D, query B X D -> B X L."""
        q = query.unsqueeze(1).expand_as(keys)                                # B X L X D
        return self.unit(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)

    def forward(self, keys: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.weights(keys, query) * mask.to(keys.dtype)                   # B X L
        return (w.unsqueeze(-1) * keys).sum(1)                                # B X D


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of B X L ``scores`` restricted to ``mask``; padded positions get
    exactly 0 and a row without any real position gets all zeros (its pooled vector is zeros)."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


class ItemAttention(nn.Module):
    """MiNet's item-level attention over one domain's recent items (Ouyang et al., 2020).

    a_j = h^T ReLU(W [r_j, q, p_u, r_j * (M q)] + b), alpha = softmax_j(a_j) over the real items,
    interest = sum_j alpha_j r_j. q: the candidate item, p_u: the user embedding. M maps the
    candidate into the attended domain's space (MiNet's transfer matrix, for the source domain;
    ``transfer=False``: M = I, for the target domain). M starts at the identity.

    Args:
        dim: D.
        hidden: width of the scoring layer W.
        transfer: learn M.

    Example::

        att = ItemAttention(8, transfer=True)
        s = att(keys, cand, user, mask)  # keys B X L X 8, cand / user B X 8 -> B X 8
    """

    def __init__(self, dim: int, hidden: int = 32, transfer: bool = False) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1, bias=False))
        self.transfer = nn.Linear(dim, dim, bias=False) if transfer else None
        if self.transfer is not None:
            with torch.no_grad():
                self.transfer.weight.copy_(torch.eye(dim))

    def scores(self, keys: torch.Tensor, query: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """a_j: keys B X L X D, query / user B X D -> B X L."""
        q = query.unsqueeze(1).expand_as(keys)
        mq = (self.transfer(query) if self.transfer is not None else query).unsqueeze(1).expand_as(keys)
        u = user.unsqueeze(1).expand_as(keys)
        return self.score(torch.cat([keys, q, u, keys * mq], dim=-1)).squeeze(-1)

    def forward(self, keys: torch.Tensor, query: torch.Tensor, user: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        alpha = masked_softmax(self.scores(keys, query, user), mask)          # B X L
        return (alpha.unsqueeze(-1) * keys).sum(1)                            # B X D


class InterestAttention(nn.Module):
    """MiNet's interest-level attention: one positive weight per interest, not normalised.

    v_k = exp(clamp(g_k^T ReLU(V_k [q, p_u, z_k] + b_k) + c_k, -c, c)) for each interest z_k
    (long-term p_u, source short-term, target short-term), with its own parameters per interest; the
    weighted interests v_k * z_k are returned. MiNet uses exp so the weights need not sum to 1
    (an interest may matter for one candidate and not another); the clamp at c = 10 only keeps
    exp finite.

    Args:
        dim: D.
        n: K, the number of interests.
        hidden: width of each scoring layer V_k.

    Example::

        att = InterestAttention(8, 3)
        z = att(torch.randn(4, 3, 8), cand, user)  # B X K X D in -> B X K X D weighted
    """

    CLAMP = 10.0

    def __init__(self, dim: int, n: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = nn.ModuleList(mlp(3 * dim, (hidden,), 1) for _ in range(n))

    def weights(self, interests: torch.Tensor, query: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """v: interests B X K X D, query / user B X D -> B X K."""
        a = torch.cat([s(torch.cat([query, user, interests[:, k]], dim=-1)) for k, s in enumerate(self.score)],
                      dim=-1)
        return torch.exp(a.clamp(-self.CLAMP, self.CLAMP))

    def forward(self, interests: torch.Tensor, query: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        return self.weights(interests, query, user).unsqueeze(-1) * interests
