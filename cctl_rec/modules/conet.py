"""CoNet's collaborative cross network (Hu et al., 2018) as the mixed / pure tower."""

from __future__ import annotations

import torch
from torch import nn

DOMAINS = ("tgt", "src")


class CoNetTower(nn.Module):
    """Two MLP columns joined by cross-connection units: B X in_dim -> B logits of one domain.

    Both columns read the same row x (a^0_tgt = a^0_src = x); per hidden layer l

        a_tgt^{l+1} = ReLU(W_tgt^l a_tgt^l + H^l a_src^l)
        a_src^{l+1} = ReLU(W_src^l a_src^l + H^l a_tgt^l)

    with ONE cross matrix H^l per layer shared by both directions (the bias is in W); each column
    ends in its own Linear to a logit. ``forward(x, domain)`` returns the ``domain`` column's logit;
    both columns run on every row, so a target row's logit depends on the source column through
    H (and vice versa). The mixed network gives target rows the tgt logit and source rows the src
    logit; the served pure network is the same module (synced), read through its tgt column.

    With ``domains=("tgt",)`` (the pure network) the source column stops one layer short: its last
    hidden layer and its output feed no target logit, so they exist only in the mixed network
    (the sync copies the rest, as for STAR's source factors).

    Args:
        in_dim: input width.
        hidden: hidden widths, the same for both columns.
        domains: the columns whose logits are read: ("tgt", "src") for the mixed network.

    Example::

        net = CoNetTower(16, (8, 4))
        net(torch.randn(3, 16), "src")  # 3 logits of the source column
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], domains: tuple[str, ...] = DOMAINS) -> None:
        super().__init__()
        if in_dim <= 0 or not hidden:
            raise ValueError(f"CoNet needs an input width > 0 and at least one hidden layer, got {in_dim}, "
                             f"{list(hidden)}")
        if "tgt" not in domains or not set(domains) <= set(DOMAINS):
            raise ValueError(f"CoNet columns are {list(DOMAINS)} and tgt is always read, got {list(domains)}")
        dims, n = [in_dim, *hidden], len(hidden)
        depth = {"tgt": n, "src": n if "src" in domains else n - 1}
        self.w = nn.ModuleDict({d: nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(depth[d]))
                                for d in DOMAINS})
        self.h = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(n))
        self.out = nn.ModuleDict({d: nn.Linear(dims[-1], 1) for d in domains})

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_tgt^L, a_src^L): both columns' last hidden layer, B X hidden[-1] each (a_src^{L-1}
        when the source column stops short)."""
        a_t = a_s = x
        for i, h in enumerate(self.h):
            t_next = torch.relu(self.w["tgt"][i](a_t) + h(a_s))
            if i < len(self.w["src"]):
                a_s = torch.relu(self.w["src"][i](a_s) + h(a_t))
            a_t = t_next
        return a_t, a_s

    def forward(self, x: torch.Tensor, domain: str = "tgt") -> torch.Tensor:
        a_t, a_s = self.columns(x)
        return self.out[domain](a_t if domain == "tgt" else a_s).squeeze(-1)
