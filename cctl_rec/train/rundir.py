"""The run directory: resolved config, sharding plan, TensorBoard events, metrics.json.

Writes are atomic (temp name in the same directory, then rename) through iopath. A run directory
belongs to one run: ``cctl-rec train`` holds an exclusive lock on ``RUN/.lock`` (``fcntl.flock``,
released by the kernel when the process ends, however it ends) while it writes, so a second
writer is refused at once instead of interleaving its checkpoints and metrics with the first's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import Any, Iterator

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


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``run_dir/.lock`` (non-blocking) for the ``with`` block.

    Raises:
        ValueError: another process holds it (named by its pid).
    """
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise ValueError(f"run directory {run_dir} is in use by another cctl-rec train"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}; expected one writer per run "
                             f"directory: wait for it to finish or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
