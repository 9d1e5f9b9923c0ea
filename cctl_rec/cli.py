"""The ``cctl-rec`` command line.

Each subcommand lives in ``cctl_rec/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. A user mistake (ValueError, TypeError, FileNotFoundError, ...) prints one
line on stderr and exits 2; a full, read-only or failing disk (ENOSPC, EDQUOT, EROFS, EIO) prints
one line and exits 1; no traceback for either (``-v`` logs it).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from cctl_rec.safe_io import DISK_ERRNOS, disk_error  # DISK_ERRNOS re-exported: OSErrors of the machine, exit 1

# Subcommands in --help order; each a module under cctl_rec.commands.
COMMANDS = ("datagen", "convert", "prepare", "download", "train", "eval", "evaluate", "export", "predict", "experiment", "plan", "bench", "doctor")

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit 2."""


USER_ERRORS = (UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               PermissionError, KeyError, IsADirectoryError, FileExistsError)

MAX_LINE = 1000
"""The error line is cut here: it quotes what the user gave, which may be anything."""


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a KeyError's without its quotes), without a C++
    backtrace and at most :data:`MAX_LINE` characters."""
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    elif isinstance(e, OSError) and (e.errno in DISK_ERRNOS or e.errno == errno.EACCES):  # no '[Errno N]'
        msg = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename and str(e.filename) not in
                                      str(e.strerror) else "")
    else:
        msg = str(e)
    lines = []
    for line in msg.splitlines():
        if line.strip().startswith(("Exception raised from", "frame #")):  # torch's C++ backtrace
            break
        if line.strip():
            lines.append(line.strip())
    text = "; ".join(lines) or type(e).__name__
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


def disk_line(e: BaseException, disk: OSError) -> str:
    """One line for a disk error found behind ``e`` (torch's RuntimeError wrapping a real ENOSPC)."""
    if e is disk or (isinstance(e, OSError) and e.errno in DISK_ERRNOS):
        return one_line(e)
    return one_line(OSError(disk.errno, f"{disk.strerror or disk}{f' ({disk.filename})' if disk.filename else ''}: "
                                        f"{one_line(e)}"))


def _close_progress_bars() -> None:
    """Ends the line of a progress bar the error interrupted, so the error starts a line of its own."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # a bar that cannot close: the error line matters more
            pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cctl-rec",
        description="CCTL (Collaborative Cross-Domain Transfer Learning, KDD'23) on TorchRec.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cctl_rec.commands.{name}").add_parser(sub)
    return parser


PATH_OPTIONS = {"out": "--out", "data": "--data", "run_dir": "--run-dir", "model": "--model",
                "features": "--features", "config": "--config"}
"""Options that name a file or directory: each is checked by ``storage.check_location`` first."""
REMOTE_OK = {("datagen", "out"), ("convert", "out"), ("prepare", "out"), ("train", "data"), ("train", "run_dir"),
             ("evaluate", "data"), ("evaluate", "run_dir"), ("predict", "data"), ("predict", "out"),
             ("predict", "model"), ("export", "out"), ("export", "run_dir"), ("experiment", "out")}
"""(command, option) pairs that take remote URLs (s3://, gs://, ...); every other path is local."""


def check_paths(args: argparse.Namespace) -> None:
    """A URL the command cannot use (unknown scheme, missing bucket or credentials, an option that
    takes local paths only): one ValueError before anything runs (``cctl_rec/storage.py``)."""
    from cctl_rec.storage import check_location

    for attr, flag in PATH_OPTIONS.items():
        value = getattr(args, attr, None)
        if isinstance(value, str) and "://" in value:
            check_location(value, flag, (args.command, attr) in REMOTE_OK,
                           ", ".join(f"{c} {PATH_OPTIONS[a]}" for c, a in sorted(REMOTE_OK)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cctl_rec.logging_utils import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    rank = os.environ.get("RANK", "0")
    if not (rank.isascii() and rank.isdigit()):  # every log line names the rank: refuse garbage first
        print(f"cctl-rec {args.command}: error: RANK must be an integer >= 0 (as torchrun sets it), got "
              f"{rank[:40]!r}", file=sys.stderr)
        return 2
    setup_logging(args.verbose)
    try:
        check_paths(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"cctl-rec {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        disk = disk_error(e)  # a full / read-only / failing disk, however torch, pyarrow or DCP wrapped it
        if disk is None and not isinstance(e, USER_ERRORS):
            raise
        if args.verbose:
            logger.exception("failed")
        line = disk_line(e, disk) if disk is not None else one_line(e)
        _close_progress_bars()
        print(f"cctl-rec {args.command}: error: {line}", file=sys.stderr)
        return 1 if disk is not None else 2


if __name__ == "__main__":
    sys.exit(main())
