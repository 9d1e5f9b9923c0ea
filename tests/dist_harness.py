"""Runs a function on N gloo ranks (file:// rendezvous, no port races).

``torch.multiprocessing.spawn`` re-raises a child's exception in the parent with the child's
traceback text, so a failing rank fails the test with its own stack.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.pop("MASTER_ADDR", None)
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Calls ``fn(rank, world_size, *args)`` in ``world_size`` processes; returns each rank's result
    (results must be torch.save-able). ``fn`` must be importable (a module-level function)."""
    import torch

    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "pg")
        mp.spawn(_entry, args=(world_size, init_file, fn, args, d), nprocs=world_size, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
