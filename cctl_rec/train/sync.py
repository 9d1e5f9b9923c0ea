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
import weakref
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _layout(t: object) -> list[tuple]:
    """(offsets, sizes, rank) of every shard of a ShardedTensor, over all ranks (its global
    metadata: the same on every rank); a plain (replicated) tensor: one full-size entry."""
    if hasattr(t, "metadata") and hasattr(t, "local_shards"):
        return sorted((tuple(s.shard_offsets), tuple(s.shard_sizes), s.placement.rank() if s.placement else None)
                      for s in t.metadata().shards_metadata)
    return [((0,) * t.dim(), tuple(t.shape), None)]


def check_same_layout(mixed: nn.Module, pure: nn.Module) -> None:
    """Raises RuntimeError unless both table sets are sharded alike on every rank.

    Compares each table's global shard metadata (offsets, sizes and the rank holding each shard),
    so every rank reaches the same verdict: a plan that puts a mixed table on rank 0 and its pure
    mirror on rank 1 is refused on all ranks, including those that hold neither.
    """
    sm, sp = mixed.state_dict(), pure.state_dict()
    if sm.keys() != sp.keys():
        raise RuntimeError(f"mixed and pure target tables differ: {sorted(sm)} vs {sorted(sp)}")
    for k in sm:
        la, lb = _layout(sm[k]), _layout(sp[k])
        if la != lb:
            raise RuntimeError(f"mixed and pure table {k} are sharded differently: {la} vs {lb} "
                               "(offsets, sizes, rank); the sync needs one plan for both")


_LAYOUT_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


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
    """Copies mixed_tgt -> pure_tgt and mixed_tower -> pure_tower (and their optimizer state).

    The first sync of a model checks that both table sets are sharded alike on every rank
    (:func:`check_same_layout`): ``load_state_dict`` copies local shards by size only, so two column
    shards of equal width with their ranks swapped would be "copied" into the wrong columns silently.
    """
    if module.pure_tgt not in _LAYOUT_CHECKED:
        check_same_layout(module.mixed_tgt, module.pure_tgt)
        _LAYOUT_CHECKED[module.pure_tgt] = True
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
