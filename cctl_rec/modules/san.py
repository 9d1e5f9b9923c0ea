"""SAN, the semantic-align network of the IFN (§2.4.1, Eq. 7)."""

from __future__ import annotations

import torch
from torch import nn

from cctl_rec.modules.tower import mlp


class SemanticAlign(nn.Module):
    """SAN: maps each source token to the width of the matching target token.

    One MLP per semantic token (user, item, context); a token whose source and target features
    are the same is passed through unchanged (the paper: SAN is skipped when schemas match).

    Args:
        src_dims: token -> source width, e.g. {"user": 56, "item": 32, "context": 24}.
        tgt_dims: token -> target width; same keys as src_dims.
        hidden: hidden widths of each token MLP.
        identity: tokens to pass through (requires equal widths).

    Example::

        san = SemanticAlign({"user": 40}, {"user": 24})
        out = san({"user": torch.randn(4, 40)})  # {"user": 4 X 24}
    """

    def __init__(self, src_dims: dict[str, int], tgt_dims: dict[str, int],
                 hidden: tuple[int, ...] = (32,), identity: frozenset[str] = frozenset()) -> None:
        super().__init__()
        if src_dims.keys() != tgt_dims.keys():
            raise ValueError(f"SAN tokens differ: source {sorted(src_dims)} vs target {sorted(tgt_dims)}")
        self.tokens = list(src_dims)
        self.maps = nn.ModuleDict()
        for t in self.tokens:
            if t in identity:
                if src_dims[t] != tgt_dims[t]:
                    raise ValueError(f"SAN identity token {t!r} needs equal widths, got "
                                     f"{src_dims[t]} vs {tgt_dims[t]}")
                self.maps[t] = nn.Identity()
            else:
                self.maps[t] = mlp(src_dims[t], hidden, tgt_dims[t])

    def forward(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: self.maps[t](tokens[t]) for t in self.tokens}
