"""The SCN tower: an MLP ending in one logit. Mixed and pure towers share this architecture."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int | None = None) -> nn.Sequential:
    """Linear+ReLU per hidden width, then a final Linear to ``out_dim`` (no activation)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    if out_dim is not None:
        layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """SCN tower (mixed or pure): B X in_dim -> B logits.

    Args:
        in_dim: width of the concatenated target-shaped tokens (v^t of Eq. 2).
        hidden: hidden widths, e.g. (256, 128, 32) for the paper's public setting.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"tower input width must be > 0, got {in_dim}")
        self.net = mlp(in_dim, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)
