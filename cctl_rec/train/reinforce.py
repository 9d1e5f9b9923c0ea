"""REINFORCE for the IFN selector (Eq. 9) with the discounted accumulated reward, computed exactly
without storing the window's batches.

For a window of steps 1..n the paper's update is

    theta += alpha / N * sum_k grad log p_k * r_accu_k,   r_accu_k = sum_{j>=0} gamma^j r_{k+j}  (j <= n-k)

(grad log p_k summed over the step's source samples, N the window's source samples). Swapping the
sums, sum_k g_k r_accu_k = sum_t r_t e_t with the eligibility trace e_t = gamma e_{t-1} + g_t, so we
keep e and G = sum_t r_t e_t (two tensors per selector parameter) and apply alpha * G / N every
``update_every`` steps. With ``causal=True`` the reward of step t credits only earlier steps'
choices (G += r_t e_{t-1}, i.e. r_accu_k = sum_{j>=1} gamma^(j-1) r_{k+j}): the reward of step t is
measured before step t's source samples have changed the mixed tower.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


class RewardShaper:
    """Optional EMA baseline and running-RMS normalisation of the scalar reward.

    Args:
        ema_baseline: decay of the reward EMA subtracted from each reward (0 = off).
        normalize: divide by the running RMS of the (baselined) reward (decay 0.99).
    """

    def __init__(self, ema_baseline: float = 0.0, normalize: bool = False) -> None:
        self.decay, self.normalize = ema_baseline, normalize
        self.baseline: Optional[float] = None
        self.sq: Optional[float] = None

    def __call__(self, r: float) -> float:
        out = r
        if self.decay > 0:
            b = self.baseline
            self.baseline = r if b is None else self.decay * b + (1 - self.decay) * r
            out = r - (b if b is not None else r)
        if self.normalize:
            self.sq = out * out if self.sq is None else 0.99 * self.sq + 0.01 * out * out
            out = out / (math.sqrt(self.sq) + 1e-12) if self.sq > 0 else 0.0
        return out

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "sq": self.sq}

    def load_state_dict(self, s: dict) -> None:
        self.baseline, self.sq = s["baseline"], s["sq"]


class Reinforce:
    """Eligibility-trace REINFORCE accumulator for a set of parameters.

    Args:
        params: the selector's parameters (updated in place, gradient ascent).
        alpha: step size of Eq. 9.
        gamma: discount of r_accu.
        update_every: steps per window.
        causal: credit a reward only to earlier steps' choices.

    Example::

        rl = Reinforce(list(selector.parameters()), alpha=1.0, gamma=0.8, update_every=1000)
        rl.observe(grads_of_sum_log_p, reward=r, n_samples=B_s)   # each step
        rl.maybe_update(step)                                      # applies every 1000 steps
    """

    def __init__(self, params: list[torch.nn.Parameter], alpha: float, gamma: float, update_every: int,
                 causal: bool = False) -> None:
        self.params, self.alpha, self.gamma = list(params), alpha, gamma
        self.update_every, self.causal = update_every, causal
        self.trace = [torch.zeros_like(p) for p in self.params]
        self.acc = [torch.zeros_like(p) for p in self.params]
        self.n = 0.0
        self.updates = 0

    @torch.no_grad()
    def observe(self, grads: list[torch.Tensor], reward: float, n_samples: int) -> None:
        """Adds one step: ``grads`` = grad of sum_i log p_i over the step's source samples."""
        for e, g, a in zip(self.trace, grads, self.acc):
            if self.causal:
                a.add_(e, alpha=reward)
                e.mul_(self.gamma).add_(g)
            else:
                e.mul_(self.gamma).add_(g)
                a.add_(e, alpha=reward)
        self.n += n_samples

    @torch.no_grad()
    def update(self) -> None:
        """theta += alpha * G / N (summed over ranks), then a new window starts."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([a.flatten() for a in self.acc] + [torch.tensor([self.n], dtype=self.acc[0].dtype)])
            dist.all_reduce(flat)
            n = float(flat[-1])
            off = 0
            for a in self.acc:
                a.copy_(flat[off:off + a.numel()].view_as(a))
                off += a.numel()
        else:
            n = self.n
        if n > 0:
            for p, a in zip(self.params, self.acc):
                p.add_(a, alpha=self.alpha / n)
        for t in self.trace + self.acc:
            t.zero_()
        self.n = 0.0
        self.updates += 1

    def maybe_update(self, step: int) -> bool:
        if step % self.update_every == 0:
            self.update()
            return True
        return False
