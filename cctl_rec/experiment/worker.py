"""Running ``cctl-rec`` commands inside a long-lived worker process (``cctl-rec experiment --jobs N``).

Starting ``cctl-rec train`` costs ~6 s of imports (torch, TorchRec, fbgemm) before the first step,
more than a whole training run on the small real datasets. A worker imports them once and runs
its share of an experiment's 1-rank runs one after another, each through :func:`cctl_rec.cli.main`
(same parsing, checks and exit codes as the command), with the process's stdout and stderr sent to
the run's ``train.log``. Every run reseeds what it uses (``train`` seeds torch from ``run.seed``;
the data order comes from the seeded reader), and ``tests/test_experiment.py`` checks that a run
in a worker that has already trained another gives the same metrics as the same run in its own
process. Workers are pinned one per core (``os.sched_setaffinity``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Optional


def pin(cores: list[int]) -> None:
    """Pool initializer: this worker runs on ``cores[i]``, i its start order (one core each)."""
    import multiprocessing as mp

    ident = mp.current_process()._identity
    core = cores[(ident[0] - 1) % len(cores)] if ident else cores[0]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    os.environ["CCTL_WORKER_CORE"] = str(core)


@contextlib.contextmanager
def _redirect(path: str):
    """fd-level redirect of stdout and stderr into ``path`` (tqdm, logging, C++ warnings alike)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def run_cli(argv: list[str], log_path: str) -> tuple[int, Optional[str]]:
    """Runs ``cctl-rec ARGV`` in this process, output into ``log_path``: (exit code, error line or None).

    A user mistake is the command's own one-line error; anything else is logged with its traceback
    and summarised as ``Type: message``."""
    from cctl_rec.cli import main

    err: Optional[str] = None
    with _redirect(log_path):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - a crash of one run must not end the experiment
            traceback.print_exc()
            rc, err = 1, f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if rc != 0 and err is None:
        err = error_line(log_path)
    return rc, err


def error_line(log_path: str) -> str:
    """The line of a failed run's log that says why: the CLI's ``error:`` line, else the last
    exception line of a traceback, else the last line that is not a progress bar."""
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError as e:
        return f"(no log: {e})"
    # a progress bar redraws with \r: keep what follows the last one of each line
    lines = [ln.split("\r")[-1].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ": error: " in ln or ln.startswith("error:"):
            return ln[:300]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return ln[:300]
    prog = [ln for ln in lines if not _is_progress(ln)]
    return (prog or lines or ["(no output)"])[-1][:300]


def _is_progress(line: str) -> bool:
    return "step/s]" in line or "s/step]" in line or ("%|" in line and "|" in line.split("%|", 1)[1])
