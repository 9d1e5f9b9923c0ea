"""The best checkpoint of a run by target valid AUC (``run.keep_best``): ``RUN/best/``.

At each evaluation (every ``run.eval_every`` steps) a valid AUC above the best so far makes the
trainer write a checkpoint of that step; :func:`keep_best` then copies it to ``RUN/best/``
(a temp directory renamed into place, so a kill leaves the previous best) with ``best.json``
(step, valid AUC, the network it measured). It lives outside ``checkpoints/``, so
``run.keep_checkpoints`` never prunes it. ``cctl-rec export --checkpoint best`` and
``cctl-rec evaluate --checkpoint best`` read it; the network they take is the one measured: the
pure network of that step.

In a run directory on a URL (no rename) the copy is made in place: ``best.json`` (the marker,
:func:`read_best` takes nothing without it) is removed first and written last, so a kill while a
new best is copied leaves no best until the next one, never a half-copied one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Optional

from iopath.common.file_io import g_pathmgr

from cctl_rec import storage
from cctl_rec.data.manifest import atomic_write_bytes, join

BEST_DIR = "best"
BEST_JSON = "best.json"


def best_dir(run_dir: str) -> str:
    return join(run_dir, BEST_DIR)


def read_best(run_dir: str) -> Optional[dict[str, Any]]:
    """``{"step", "valid_auc", "network", "path"}`` of the run's best checkpoint, or None."""
    path = join(best_dir(run_dir), BEST_JSON)
    if not g_pathmgr.exists(path):
        return None
    from cctl_rec.safe_io import decode_json, read_bounded

    meta = decode_json(read_bounded(path, 1 << 20, "best-checkpoint file"), path)
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and meta.get("network") in ("pure", "mixed")):
        raise ValueError(f"{path} is not a cctl-rec best-checkpoint record; expected step, valid_auc and network")
    return {**meta, "path": best_dir(run_dir)}


def better(auc: Optional[float], best: Optional[float]) -> bool:
    """True when ``auc`` (not None: undefined with one label class) beats ``best`` (None: none yet)."""
    return auc is not None and (best is None or auc > best)


def best_so_far(run_dir: str) -> Optional[float]:
    """The recorded best valid AUC (a resumed run continues from it), the same on every rank:
    rank 0 reads ``best.json`` and broadcasts it (a collective when distributed)."""
    import torch.distributed as dist

    value = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        best = read_best(run_dir)
        value = [float(best["valid_auc"]) if best is not None and best.get("valid_auc") is not None else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]


def improves(run_dir: str, auc: Optional[float]) -> bool:
    """True when ``auc`` (not None) beats the recorded best (or there is none)."""
    if auc is None:
        return False
    best = read_best(run_dir)
    return best is None or auc > float(best["valid_auc"])


def keep_best(run_dir: str, step: int, auc: float, ckpt: str, network: str = "pure") -> str:
    """Copies checkpoint ``ckpt`` (of ``step``, valid AUC ``auc``) to ``RUN/best/``; rank 0 only."""
    dst = best_dir(run_dir)
    name = ckpt.rstrip("/").rsplit("/", 1)[-1]
    record = (json.dumps({"step": step, "valid_auc": auc, "network": network, "from": name}) + "\n").encode()
    if storage.is_remote(run_dir):
        storage.remove_tree(dst, first=BEST_JSON)
        storage.copy_tree(ckpt, dst)
        storage.write_object(join(dst, BEST_JSON), record)
        return dst
    tmp = os.path.join(run_dir, f".{BEST_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(ckpt, tmp)
        atomic_write_bytes(os.path.join(tmp, BEST_JSON), record)
        if os.path.exists(dst):
            old = tmp + ".old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
