"""The run directory: resolved config, sharding plan, TensorBoard events, metrics.json.

Writes are atomic (temp name in the same directory, then rename) through iopath. A run directory
belongs to one run: ``cctl-rec train`` holds an exclusive lock on ``RUN/.lock`` (``fcntl.flock``,
released by the kernel when the process ends, however it ends) while it writes, so a second
writer is refused at once instead of interleaving its checkpoints and metrics with the first's.

A run directory may be a URL (``s3://bucket/run``, docs/storage.md): the files above are objects
written through iopath's fsspec handler; TensorBoard's event files, which grow by appending, are
written to a local staging directory and uploaded (:class:`StagedSummaryWriter`). An object store
has no lock: one writer per remote run directory is the launcher's to ensure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import hashlib
import logging
import os
import shutil
import time
from typing import Any, Iterator, Optional

from iopath.common.file_io import g_pathmgr

from cctl_rec import storage
from cctl_rec.data.manifest import atomic_write_bytes, join
from cctl_rec.safe_io import first_line

logger = logging.getLogger(__name__)


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
    if storage.is_remote(run_dir):  # a prefix: nothing to make (the CLI checked the bucket)
        return run_dir
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


TB_UPLOAD_SECS = 60.0
"""Least time between two uploads of the staged TensorBoard events at log lines (checkpoints and
the end of the run upload regardless)."""


def tensorboard_staging(run_dir: str) -> str:
    """The local directory staging the TensorBoard events of the remote run directory ``run_dir``:
    ``CCTL_REC_CACHE/runs/<sha256 of the URL>/tb`` (one per URL, so a restarted job on the same
    machine uploads what its killed attempt wrote)."""
    return os.path.join(storage.cache_root(), "runs", hashlib.sha256(run_dir.encode()).hexdigest()[:32], "tb")


def tensorboard_writer(run_dir: str, fresh: bool) -> Any:
    """TensorBoard's ``SummaryWriter`` on ``RUN/tb`` (local run directory), or a
    :class:`StagedSummaryWriter` for a URL; ``fresh`` (a run that resumes nothing) clears an
    earlier run's staged files first."""
    from torch.utils.tensorboard import SummaryWriter

    if not storage.is_remote(run_dir):
        return SummaryWriter(os.path.join(run_dir, "tb"))

    class StagedSummaryWriter(SummaryWriter):
        """Writes event files locally (:func:`tensorboard_staging`) and uploads them to ``RUN/tb/``:
        :meth:`upload` (at most every :data:`TB_UPLOAD_SECS` unless forced) and on ``close``."""

        def __init__(self, remote: str, local: str) -> None:
            super().__init__(local)
            self.remote, self._last = remote, time.monotonic()

        def upload(self, force: bool = False) -> None:
            if not force and time.monotonic() - self._last < TB_UPLOAD_SECS:
                return
            self.flush()
            for name in sorted(os.listdir(self.log_dir)):
                path = os.path.join(self.log_dir, name)
                if os.path.isfile(path):
                    storage.put_file(path, join(self.remote, name))
            self._last = time.monotonic()

        def close(self) -> None:
            super().close()
            self.upload(force=True)

    local = tensorboard_staging(run_dir)
    if fresh:
        shutil.rmtree(local, ignore_errors=True)
    return StagedSummaryWriter(join(run_dir, "tb"), local)


def upload_tensorboard(writer: Optional[Any], force: bool = False) -> None:
    """Uploads a remote run directory's staged TensorBoard events (nothing for a local one). A
    failed upload is a warning: the events stay staged and go up with the next one."""
    upload = getattr(writer, "upload", None)
    if upload is None:
        return
    try:
        upload(force)
    except OSError as e:
        logger.warning("could not upload TensorBoard events to %s (%s); retried at the next checkpoint",
                       writer.remote, first_line(e))
