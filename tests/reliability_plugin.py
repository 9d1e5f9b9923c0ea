"""Records the outcome of every test marked ``reliability(category, case)`` for docs/reliability.md.

Mark a test (or one ``pytest.param``) with::

    @pytest.mark.reliability("data", "negative ids", expect="exit 2, one line naming the id and [0, N)")

``expect`` is optional; without it the report shows the first paragraph of the test's docstring.
With ``CCTL_RELIABILITY_OUT=path`` (or ``--reliability-out path``) set, the session writes
``path`` as JSON at its end: the command, date, versions, and per marked test its category,
case, expectation, node id and outcome (passed / failed / skipped / xfailed / xpassed).
``scripts/reliability_report.py`` turns that JSON into docs/reliability.md (``make reliability``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Optional

import pytest

ENV = "CCTL_RELIABILITY_OUT"
MARKER = "reliability"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-out", default=None,
                     help=f"write the outcomes of @pytest.mark.{MARKER} tests as JSON here (or env {ENV})")


def _expectation(item: pytest.Item, marker: pytest.Mark) -> str:
    if marker.kwargs.get("expect"):
        return str(marker.kwargs["expect"])
    doc = getattr(getattr(item, "obj", None), "__doc__", None) or ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())


def check_marker(item: pytest.Item) -> Optional[pytest.Mark]:
    """The item's reliability marker, validated: two strings, category and case."""
    m = item.get_closest_marker(MARKER)
    if m is None:
        return None
    if len(m.args) != 2 or not all(isinstance(a, str) and a for a in m.args):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} takes (category, case) as two "
                                f"non-empty strings, got {m.args!r}")
    unknown = set(m.kwargs) - {"expect"}
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} has unknown keyword(s) {sorted(unknown)}; "
                                f"expected only expect=")
    return m


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "pyarrow", "pytest", "cctl-rec"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class Recorder:
    """Collects marked tests' outcomes; writes them at the end of the session."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        rep = outcome.get_result()
        m = check_marker(item)
        if m is None:
            return
        row = self.rows.setdefault(item.nodeid, {
            "category": m.args[0], "case": m.args[1], "expect": _expectation(item, m), "test": item.nodeid,
            "outcome": None, "duration_s": 0.0, "detail": ""})
        row["duration_s"] += rep.duration
        if hasattr(rep, "wasxfail"):
            row["outcome"] = "xfailed" if rep.skipped else "xpassed"
        elif rep.failed:
            row["outcome"] = "failed"
            row["detail"] = f"{rep.when}: " + (str(rep.longrepr).strip().splitlines() or [""])[-1][:300]
        elif rep.skipped and row["outcome"] != "failed":
            row["outcome"] = "skipped"
            lr = rep.longrepr
            row["detail"] = str(lr[2] if isinstance(lr, tuple) and len(lr) == 3 else lr)[:300]
        elif rep.when == "call" and rep.passed and row["outcome"] is None:
            row["outcome"] = "passed"

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        doc = {
            "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", "-m", "pytest", *sys.argv[1:]]),
            "exit_status": int(exitstatus),
            "versions": _versions(),
            "results": sorted(self.rows.values(), key=lambda r: (r["category"], r["case"], r["test"])),
        }
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)


def configure(config: pytest.Config) -> None:
    """Registers the recorder when an output path is given (called from tests/conftest.py)."""
    path = config.getoption("--reliability-out") or os.environ.get(ENV)
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(Recorder(path), "cctl-reliability-recorder")
