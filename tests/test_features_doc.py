"""docs/features.md's worked example, run as written: raw logs -> feature config -> train on the
raw logs (the mapping cached in the run directory) -> export -> predict on the raw test logs
(issue #19)."""

import json
import os
import re
import shlex

import numpy as np
import pyarrow.parquet as pq
import pytest

from cctl_rec.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "features.md")
SHORT = ["run.steps=30", "run.log_every=10", "scn.sync_every=10"]
"""Appended to the doc's train command to keep the test short."""


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", open(DOC, encoding="utf-8").read(), flags=re.S)


def named(lang: str) -> dict[str, str]:
    """``# name`` on a block's first line -> the block."""
    out = {}
    for b in blocks(lang):
        first = b.splitlines()[0]
        if first.startswith("# "):
            out[first[2:].split(":")[0].strip()] = b
    return out


def auc(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


@pytest.mark.slow  # trains, exports and scores: about 10-20 s on one core
def test_the_worked_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    py, yml = named("python"), named("yaml")
    exec(compile(py["make_logs.py"], "make_logs.py", "exec"), {"__name__": "__main__"})
    (tmp_path / "my_features.yaml").write_text(yml["my_features.yaml"])
    commands = [shlex.split(line) for b in blocks("bash") for line in b.splitlines() if line.startswith("cctl-rec ")]
    assert [c[1] for c in commands] == ["train", "export", "predict"]
    assert "--features" in commands[0]  # one command from the raw logs
    for cmd in commands[:2]:
        args = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in cmd[1:]]
        if args[0] == "train":
            args += SHORT
        assert main(args) == 0, args
    assert [n for n in os.listdir(tmp_path / "runs" / "mine" / "prepared")] == [
        json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())["data"].rsplit("/", 1)[-1]]
    assert main(commands[2][1:]) == 0
    scores = pq.read_table("scores.parquet").column("prob").to_numpy()
    y = pq.read_table("my_logs/tgt/test/part-0.parquet").column("clicked").to_numpy()
    m = json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())
    # the served model, mapping the raw rows at serving time, scores as the trainer evaluated it
    assert auc(y, scores) == pytest.approx(m["target_test"]["auc"], abs=1e-4)
    assert m["target_test"]["auc"] > 0.6  # the planted user and item effects are learnt
