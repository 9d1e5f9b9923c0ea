"""The reward the selector learns from (Eq. 5), in one place.

r = Loss_pure - Loss_mixed on the same target rows: positive when the mixed network, trained on the
weighted source rows too, fits the target better than the pure network trained on the target alone.
Which target rows (``scn.reward_source``):

- ``train_batch`` (the paper): the step's own target rows, r = Loss_pure - Loss_tgt of the step's
  losses (:func:`cctl_rec.train.losses.scn_losses` computes it with :func:`eq5`);
- ``heldout_batch``: a batch of ``tgt/valid`` rows, both networks' loss measured without a step.

Each rank measures its own r; :func:`rank_mean` makes it one r for every rank's selector.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from cctl_rec.distributed.env import allreduce_mean_, collective_device


def eq5(loss_pure: torch.Tensor, loss_mixed: torch.Tensor) -> torch.Tensor:
    """Eq. 5: r = Loss_pure - Loss_mixed (scalars; detached: the reward trains nothing by gradient)."""
    return (loss_pure - loss_mixed).detach()


@torch.no_grad()
def heldout_reward(module: Any, batch: Any) -> torch.Tensor:
    """Eq. 5 on a held-out target batch: BCE of the pure network minus BCE of the mixed network.

    Args:
        module: the CCTL module (``predict(kjt, "pure" | "mixed")`` -> B logits).
        batch: a target-only batch (``tgt``, ``tgt_label``: B labels).
    """
    y = batch.tgt_label
    return eq5(F.binary_cross_entropy_with_logits(module.predict(batch.tgt, "pure", batch.tgt_dense), y),
               F.binary_cross_entropy_with_logits(module.predict(batch.tgt, "mixed", batch.tgt_dense), y))


def step_reward(step_losses: Any, module: Any, heldout: Optional[Any]) -> float:
    """This rank's reward of one step: on ``heldout`` (a held-out target batch) when given, else
    the step's own ``step_losses.reward``."""
    return float(heldout_reward(module, heldout) if heldout is not None else step_losses.reward)


def rank_mean(r: float) -> float:
    """The mean of ``r`` over ranks (``r`` itself on one rank): every selector sees one reward."""
    t = torch.tensor([r], dtype=torch.float64, device=collective_device())
    allreduce_mean_([t])
    return float(t)
