"""Process group and device: nccl + cuda:LOCAL_RANK when CUDA is there, gloo + CPU otherwise.

Under torchrun the usual RANK / WORLD_SIZE / MASTER_ADDR variables are read; a plain process
gets a 1-rank gloo group on a file store, so every run goes through DistributedModelParallel.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def resolve_device(device: str = "auto", backend: str = "auto") -> tuple[torch.device, str]:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("dist.device=cuda but CUDA is not available on this machine; use dist.device=cpu")
    use_cuda = device == "cuda" or (device == "auto" and cuda)
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("dist.backend=nccl needs CUDA; use dist.backend=gloo on CPU")
    return dev, backend


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Initialises the default process group (once) and returns this rank's environment."""
    dev, backend = resolve_device(device, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            fd, path = tempfile.mkstemp(prefix="cctl-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group(backend=backend, init_method=f"file://{path}", rank=0, world_size=1)
    env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dev,
                  backend)
    logger.info("rank %d of %d on %s (%s)", env.rank, env.world_size, dev, backend)
    return env


def collective_device() -> torch.device:
    """Where a tensor must live for the default group's collectives: this rank's GPU under nccl,
    else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Averages tensors across ranks in place, with one all_reduce (a no-op on one rank)."""
    if not tensors or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    off = 0
    for t in tensors:
        t.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``t`` (lengths may differ), concatenated in rank order (``t`` on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    ws = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ws)]
    dist.all_gather(sizes, torch.tensor([t.numel()]))
    n_max = int(max(int(x) for x in sizes))
    parts = [torch.zeros(n_max, dtype=t.dtype) for _ in range(ws)]
    dist.all_gather(parts, torch.cat([t, t.new_zeros(n_max - t.numel())]))
    return torch.cat([p[:int(x)] for p, x in zip(parts, sizes)])
