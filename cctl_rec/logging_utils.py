"""Logging set up once by the CLI: INFO on rank 0, WARNING elsewhere, ``[rank0] time level name: msg``.

fbgemm logs every TBE's construction at INFO on the root logger and TorchRec validates inputs at
INFO; those (and known deprecation chatter from the stack) are kept below WARNING unless
``--verbose``, and a warning the stack repeats word for word (TorchRec says "Sharding Type is
data_parallel, caching params will be ignored" once per table) is said once per process.

Progress bars (:func:`progress`) and log lines share stderr without gluing: on a terminal a log
line is written through ``tqdm.write`` (above the bar), elsewhere (a file, a pipe, torchx's log)
every bar update is a line of its own.

``kill -USR1 <pid>`` prints every thread's Python stack of a cctl-rec process to its stderr
(:mod:`faulthandler`): what a rank that makes no progress is waiting for.

``cctl-rec train`` also writes each rank's log, at INFO on every rank, into the run directory
(:func:`attach_run_log`: ``RUN/logs/rank<r>.log``, appended to by a resumed or restarted run;
on a URL staged locally and uploaded at every checkpoint and at the end, like TensorBoard's
events).
"""

from __future__ import annotations

import faulthandler
import hashlib
import io
import logging
import os
import signal
import sys
import warnings
from typing import Any, Optional

NOISY = ("root", "torchrec", "fbgemm_gpu", "torch")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _QuietStack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and str(record.msg).startswith("Sharding spec not found"):
            return False  # printing a plan whose data_parallel tables have no shard spec
        if record.levelno >= logging.WARNING and record.name != "torchrec.distributed.planner.types":
            return True
        return not any(record.name == n or record.name.startswith(n + ".") for n in NOISY)


def _third_party(name: str) -> bool:
    return not (name == "cctl_rec" or name.startswith("cctl_rec.") or name == "__main__")


class _Once(logging.Filter):
    """Drops a record of the stack (not of cctl_rec) below ERROR whose logger, level and text
    were already let through once."""

    CAP = 10000

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not _third_party(record.name):
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        if len(self.seen) < self.CAP:  # texts that differ every time (a step number) stop being remembered
            self.seen.add(key)
        return True


class _BarSafeHandler(logging.StreamHandler):
    """A stream handler that writes above a live progress bar on a terminal (``tqdm.write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        if not getattr(tqdm, "_instances", None) or not _isatty(self.stream):
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: a failed emit is reported, never raised
            self.handleError(record)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class _LineBar:
    """tqdm's output stream where it is not a terminal: each bar update becomes a line of its own
    (tqdm redraws with a carriage return, which a log file or pipe keeps, so the next log line
    would be glued after the bar); tqdm's clearing writes (blanks only) are dropped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def progress(*args: Any, **kwargs: Any) -> Any:
    """``tqdm(*args, **kwargs)`` on stderr that never shares a line with a log line."""
    from tqdm import tqdm

    if "file" not in kwargs and not _isatty(sys.stderr):
        kwargs["file"] = _LineBar(sys.stderr)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
    return tqdm(*args, **kwargs)


def _formatter() -> logging.Formatter:
    return logging.Formatter(f"[rank{rank()}] %(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def setup_logging(verbose: bool = False) -> None:
    r = rank()
    level = logging.DEBUG if verbose else (logging.INFO if r == 0 else logging.WARNING)
    handler = _BarSafeHandler(sys.stderr)
    handler.setFormatter(_formatter())
    handler.setLevel(level)
    if not verbose:
        handler.addFilter(_QuietStack())
        handler.addFilter(_Once())
        for cat in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=cat)
        warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
        warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad.*")
        warnings.filterwarnings("ignore", message=".*The given NumPy array is not writable.*")
        warnings.filterwarnings("ignore", message=".*static_graph.*")
        warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
        # data_parallel tables on CPU use fbgemm's dense lookup, whose autograd goes through the
        # fallback; tests/test_sharding.py checks its gradients against an unsharded table.
        warnings.filterwarnings("ignore", message=".*dense_embedding_codegen_lookup_function.*")
    if hasattr(signal, "SIGUSR1") and sys.stderr is not None and hasattr(sys.stderr, "fileno"):
        try:  # kill -USR1 <pid>: every thread's stack on stderr (a rank that hangs says where)
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        except (ValueError, OSError, io.UnsupportedOperation):  # stderr without a file descriptor (captured)
            pass
    early = _Early(logging.DEBUG if verbose else logging.INFO)  # for the run log, until it is attached
    if not verbose:
        early.addFilter(_QuietStack())
        early.addFilter(_Once())
    root = logging.getLogger()
    root.handlers[:] = [handler, early]
    root.setLevel(min(level, logging.INFO))  # the run log takes INFO on every rank; stderr's level is the handler's
    _VERBOSE[0] = verbose
    if not verbose:
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


_VERBOSE = [False]


class _Early(logging.Handler):
    """Keeps the first records (the command's start: planner, sharding) until :func:`attach_run_log`
    writes them into the run log; at most :attr:`CAP`."""

    CAP = 5000

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.CAP:
            self.records.append(record)
_RUN_LOG: list[Any] = []  # the handler attach_run_log added, at most one


class _RunLogHandler(logging.FileHandler):
    """``RUN/logs/rank<r>.log``: a local file appended to; for a run directory on a URL a staged
    local file, uploaded by :meth:`upload`."""

    def __init__(self, local: str, remote: Optional[str]) -> None:
        super().__init__(local, mode="a", encoding="utf-8")
        self.remote = remote

    def upload(self) -> None:
        if self.remote is None:
            return
        from cctl_rec import storage

        self.flush()
        try:
            storage.put_file(self.baseFilename, self.remote)
        except Exception as e:  # the file stays staged; the next upload carries it
            logging.getLogger(__name__).warning("could not upload the run log to %s (%s: %s)", self.remote,
                                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def run_log_path(run_dir: str, r: Optional[int] = None) -> str:
    """``RUN/logs/rank<r>.log`` (of this process's rank by default)."""
    return f"{run_dir.rstrip('/')}/logs/rank{rank() if r is None else r}.log"


def attach_run_log(run_dir: str) -> str:
    """Writes this rank's log (INFO and above, the stack's chatter filtered as on stderr) into
    :func:`run_log_path` from now on, appending to what an earlier attempt wrote; replaces the run
    log attached before, if any. For a URL the file is staged under ``CCTL_REC_CACHE/runs/<sha256
    of the URL>/logs/`` (fetched from the run directory first when this machine has no staged
    copy) and uploaded by :func:`upload_run_log`. Returns the log's path."""
    from cctl_rec import storage

    detach_run_log(upload=False)
    path = run_log_path(run_dir)
    remote = path if storage.is_remote(run_dir) else None
    if remote is None:
        local = path
    else:
        local = os.path.join(storage.cache_root(), "runs", hashlib.sha256(run_dir.encode()).hexdigest()[:32],
                             "logs", os.path.basename(path))
        if not os.path.exists(local):  # another machine (or a cleaned cache) ran the earlier attempt
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs = storage.filesystem(storage.scheme_of(remote))
            try:
                fs.get_file(remote, local)
            except FileNotFoundError:
                pass
    os.makedirs(os.path.dirname(local), exist_ok=True)
    handler = _RunLogHandler(local, remote)
    handler.setFormatter(_formatter())
    handler.setLevel(logging.DEBUG if _VERBOSE[0] else logging.INFO)
    if not _VERBOSE[0]:
        handler.addFilter(_QuietStack())
        handler.addFilter(_Once())
    root = logging.getLogger()
    for early in [h for h in root.handlers if isinstance(h, _Early)]:  # what was said before the run dir
        root.removeHandler(early)
        for record in early.records:
            if record.levelno >= handler.level:
                handler.emit(record)
    root.addHandler(handler)
    if root.level > handler.level or root.level == logging.NOTSET:
        root.setLevel(handler.level)
    _RUN_LOG.append(handler)
    return path


def upload_run_log() -> None:
    """Uploads the staged run log of a run directory on a URL (nothing for a local one)."""
    for h in _RUN_LOG:
        h.upload()


def detach_run_log(upload: bool = True) -> None:
    """Stops writing the run log (uploading it first for a URL)."""
    root = logging.getLogger()
    while _RUN_LOG:
        h = _RUN_LOG.pop()
        if upload:
            h.upload()
        root.removeHandler(h)
        h.close()
