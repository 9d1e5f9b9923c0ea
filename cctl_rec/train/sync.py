"""SCN parameter synchronisation (§2.3.5): copy the mixed network into the pure network.

The mixed and pure target tables share one sharding plan, so the copy is shard-local: each rank
copies its own shards (ShardedTensor local shards, or replicated tensors for data_parallel).
With ``optimizer_state=True`` the pure network's optimizer state becomes the mixed network's
too: the dense Adam moments and the fused TBE (rowwise Adagrad) state. That makes the pure network
after a sync exactly the mixed network minus the source data from then on.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def check_same_layout(mixed: nn.Module, pure: nn.Module) -> None:
    """Raises RuntimeError unless both table sets hold the same shards on this rank."""
    sm, sp = mixed.state_dict(), pure.state_dict()
    if sm.keys() != sp.keys():
        raise RuntimeError(f"mixed and pure target tables differ: {sorted(sm)} vs {sorted(sp)}")
    for k in sm:
        a, b = sm[k], sp[k]
        la = [(tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes)) for s in a.local_shards()] \
            if hasattr(a, "local_shards") else [((0,), tuple(a.shape))]
        lb = [(tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes)) for s in b.local_shards()] \
            if hasattr(b, "local_shards") else [((0,), tuple(b.shape))]
        if la != lb:
            raise RuntimeError(f"mixed and pure table {k} are sharded differently on this rank: {la} vs {lb}; "
                               "the sync needs one plan for both")


def _tower_pairs(module: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(mixed, pure) tower parameters matched by name; the pure tower may lack the mixed one's
    source-only parameters (STAR's source factors), never the other way round."""
    pure = dict(module.pure_tower.named_parameters())
    pairs = [(pm, pure.pop(n)) for n, pm in module.mixed_tower.named_parameters() if n in pure]
    if pure:
        raise RuntimeError(f"pure tower parameters without a mixed counterpart: {sorted(pure)}")
    return pairs


@torch.no_grad()
def sync_mixed_to_pure(module: nn.Module, dense_opt: Optional[torch.optim.Optimizer],
                       optimizer_state: bool = True, dp_tables: Optional[object] = None) -> None:
    """Copies mixed_tgt -> pure_tgt and mixed_tower -> pure_tower (and their optimizer state)."""
    module.pure_tgt.load_state_dict(module.mixed_tgt.state_dict())
    pairs = _tower_pairs(module)
    for pm, pp in pairs:
        pp.copy_(pm)
    if not optimizer_state:
        return
    fm = getattr(module.mixed_tgt, "fused_optimizer", None)
    fp = getattr(module.pure_tgt, "fused_optimizer", None)
    if fm is not None and fp is not None:
        fp.load_state_dict(fm.state_dict())
    if dp_tables is not None:  # data_parallel tables' optimizer state
        dp_tables.copy_state("mixed_tgt", "pure_tgt")
    if dense_opt is not None:
        for pm, pp in pairs:
            if pm in dense_opt.state:
                dense_opt.state[pp] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                       for k, v in dense_opt.state[pm].items()}
