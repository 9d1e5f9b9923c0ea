"""The IFN selector (§2.4.2, Eq. 8): an MLP with a sigmoid output, one weight per source sample."""

from __future__ import annotations

import math

import torch
from torch import nn

from cctl_rec.modules.tower import mlp


class Selector(nn.Module):
    """p_i^s = sigmoid(clamp(W_m h_{m-1} + b_m)): B_s X in_dim -> B_s in (0, 1).

    The input is the SAN-aligned source representation, detached by the caller: the tower loss
    never trains the selector (Eq. 3 uses p_i as a constant weight).

    Args:
        in_dim: width of the aligned source representation.
        hidden: hidden widths.
        logit_clamp: |logit| bound, so p stays in [sigmoid(-c), sigmoid(c)]; REINFORCE with
            same-signed rewards otherwise grows the last layer multiplicatively until NaN.
        init_p: every row's p at the start: the output unit's bias is logit(init_p) (within the
            clamp), its weights start at 0.01 x their default so p starts at init_p for every row.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], logit_clamp: float = 8.0,
                 init_p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < init_p < 1.0:
            raise ValueError(f"selector init_p must be in (0, 1), got {init_p}")
        self.net = mlp(in_dim, hidden, 1)
        self.logit_clamp = float(logit_clamp)
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        bias = math.log(init_p / (1.0 - init_p))
        nn.init.constant_(last.bias, max(-self.logit_clamp, min(self.logit_clamp, bias)))
        if init_p != 0.5:
            with torch.no_grad():
                last.weight.mul_(0.01)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1).clamp(-self.logit_clamp, self.logit_clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
