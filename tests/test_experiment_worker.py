"""`cctl-rec experiment --jobs N`: runs inside long-lived workers equal runs in their own process;
a failed run is reported with the line that says why, never a progress bar."""

import json
import subprocess
import sys

import pytest

from cctl_rec.experiment.worker import error_line

FAST = ["data.batch_size=64", "run.steps=6", "model.tower=[8]", "run.max_eval_rows=256", "run.log_every=2",
        "scn.sync_every=3", "selector.update_every=2"]


def _metrics(path):
    m = json.loads(open(path).read())
    return m["target_test"], m["target_valid"], m["selector"]


@pytest.mark.slow
def test_runs_in_a_worker_equal_runs_in_their_own_process(tmp_path, tiny_data):
    from cctl_rec.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text("\n".join([
        "name: w", "seeds: [0, 1]", "datasets:", f"  tiny: {{path: {tiny_data}}}", f"overrides: {json.dumps(FAST)}",
        "models:", "  - {name: DNN, config: configs/cctl_tiny.yaml, overrides: [model.name=dnn]}",
        "  - {name: CCTL, config: configs/cctl_tiny.yaml}"]) + "\n")
    out = tmp_path / "out"
    assert main(["experiment", "--config", str(exp), "--out", str(out), "--jobs", "2"]) == 0
    # the last run of each worker followed another run in the same process; each equals a fresh process
    for model, seed in (("dnn", 1), ("cctl", 0), ("cctl", 1)):
        fresh = tmp_path / f"fresh-{model}-{seed}"
        over = FAST + ([] if model == "cctl" else ["model.name=dnn"]) + [f"run.seed={seed}"]
        r = subprocess.run([sys.executable, "-m", "cctl_rec.cli", "train", "--config", "configs/cctl_tiny.yaml",
                            "--data", tiny_data, "--run-dir", str(fresh), *over], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-500:]
        assert _metrics(out / f"runs/tiny/{model}/seed{seed}/metrics.json") == _metrics(fresh / "metrics.json")
    # --report-only: the same report from the finished runs, nothing trained
    before = json.loads((out / "results.json").read_text())["summary"]
    (out / "runs/tiny/dnn/seed1/metrics.json").rename(out / "gone.json")
    assert main(["experiment", "--config", str(exp), "--out", str(out), "--report-only"]) == 0
    after = json.loads((out / "results.json").read_text())["summary"]["tiny"]["models"]
    assert after["CCTL"] == before["tiny"]["models"]["CCTL"] and after["DNN"]["seeds"] == [0]
    # each run's wall time is kept beside its metrics, so the report still sums the whole benchmark's
    assert len(after["CCTL"]["wall_seconds"]) == 2 and all(w > 0 for w in after["CCTL"]["wall_seconds"])
    walls = [w for m in after.values() for w in m["wall_seconds"]]
    assert f"compute time: {sum(walls) / 60:.1f} worker-min over the {len(walls)} of " in (out / "report.md").read_text()
    assert not (out / "runs/tiny/dnn/seed1/metrics.json").exists()


def test_the_error_line_is_the_reason_not_the_progress_bar(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("[rank0] 12:00:00 INFO cctl_rec.train.loop: training cctl\n"
                   "train:   0%|          | 0/10 [00:00<?, ?step/s]\r"
                   "train:  10%|#         | 1/10 [00:01<00:09, 1.00step/s]\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "ValueError: need at least one array to concatenate\n"
                   "train:  10%|#         | 1/10 [00:01<00:09, 1.00step/s]\n")
    assert error_line(str(log)) == "ValueError: need at least one array to concatenate"
    log.write_text("train:  50%|#####     | 5/10 [00:01<00:01, 5.00step/s]\n"
                   "cctl-rec train: error: selector.gamma must be in [0, 1], got 7.0\n")
    assert error_line(str(log)) == "cctl-rec train: error: selector.gamma must be in [0, 1], got 7.0"
    log.write_text("train:  50%|#####     | 5/10 [00:01<00:01, 5.00step/s]\nKilled\n")
    assert error_line(str(log)) == "Killed"
