"""Moving whole (unsharded) tensors in and out of a sharded model's state."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _local_shards(t):
    return t.local_shards() if hasattr(t, "local_shards") else None


@torch.no_grad()
def load_full_state(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copies full tensors (same keys as ``module.state_dict()``) into a sharded module: each rank
    fills its local shards from the matching slice; plain tensors are copied whole."""
    own = module.state_dict()
    missing = sorted(set(own) - set(full))
    if missing:
        raise KeyError(f"state lacks {missing[:5]}")
    for k, t in own.items():
        src = full[k]
        shards = _local_shards(t)
        if shards is None:
            t.copy_(src)
            continue
        for s in shards:
            o, z = s.metadata.shard_offsets, s.metadata.shard_sizes
            s.tensor.copy_(src[o[0]:o[0] + z[0], o[1]:o[1] + z[1]])


@torch.no_grad()
def gather_full_state(module: nn.Module, keys_prefix: str = "") -> dict[str, torch.Tensor]:
    """Full tensors of ``module.state_dict()`` (keys starting with ``keys_prefix``) on every rank."""
    out = {}
    for k, t in module.state_dict().items():
        if not k.startswith(keys_prefix):
            continue
        if _local_shards(t) is None:
            out[k] = t.detach().clone()
            continue
        full = torch.zeros(t.size(), dtype=t.dtype)
        for s in t.local_shards():
            o, z = s.metadata.shard_offsets, s.metadata.shard_sizes
            full[o[0]:o[0] + z[0], o[1]:o[1] + z[1]] = s.tensor
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(full)  # each element lives on exactly one rank
        out[k] = full
    return out
