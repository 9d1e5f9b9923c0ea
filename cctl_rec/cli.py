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
import sys
from typing import Optional, Sequence

# Subcommands in --help order; each a module under cctl_rec.commands.
COMMANDS = ("datagen", "convert", "download", "train", "eval", "export", "predict", "experiment", "plan", "bench", "doctor")

logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit 2."""


USER_ERRORS = (UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               PermissionError, KeyError, IsADirectoryError, FileExistsError)
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
"""OSErrors of the machine rather than the user: one line too, exit code 1."""


def one_line(e: BaseException) -> str:
    """The exception's message on one line (a KeyError's without its quotes)."""
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    elif isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        msg = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename and str(e.filename) not in
                                      str(e.strerror) else "")
    else:
        msg = str(e)
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cctl-rec",
        description="CCTL (Collaborative Cross-Domain Transfer Learning, KDD'23) on TorchRec.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cctl_rec.commands.{name}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cctl_rec.logging_utils import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.verbose:
            logger.exception("failed")
        print(f"cctl-rec {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        if args.verbose:
            logger.exception("failed")
        print(f"cctl-rec {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cctl-rec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
