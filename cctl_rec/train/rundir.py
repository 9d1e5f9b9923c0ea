"""The run directory: resolved config, sharding plan, TensorBoard events, metrics.json.

Writes are atomic (temp name in the same directory, then rename) through iopath.
"""

from __future__ import annotations

import json
import os
from typing import Any

from iopath.common.file_io import g_pathmgr

from cctl_rec.data.manifest import atomic_write_bytes


def atomic_write_text(path: str, text: str) -> None:
    d = os.path.dirname(path)
    if d:
        g_pathmgr.mkdirs(d)
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def prepare_run_dir(run_dir: str) -> str:
    if not run_dir:
        raise ValueError("--run-dir must name a directory, got ''")
    if g_pathmgr.exists(run_dir) and not g_pathmgr.isdir(run_dir):
        raise NotADirectoryError(f"--run-dir {run_dir} exists and is not a directory")
    try:
        g_pathmgr.mkdirs(run_dir)
    except OSError as e:
        raise PermissionError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    if not os.access(g_pathmgr.get_local_path(run_dir), os.W_OK):
        raise PermissionError(f"run directory {run_dir} is not writable")
    return run_dir


def plan_to_json(plan: Any) -> dict:
    """TorchRec ShardingPlan -> {module: {table: {sharding_type, compute_kernel, ranks, shards}}}."""
    out: dict = {}
    for module, tables in plan.plan.items():
        out[module] = {}
        for table, ps in tables.items():
            shards = []
            spec = ps.sharding_spec
            for s in getattr(spec, "shards", []) or []:
                shards.append({"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                               "placement": str(s.placement)})
            out[module][table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                                  "ranks": list(ps.ranks) if ps.ranks is not None else None, "shards": shards}
    return out
