"""A rank killed mid-run: torchrun (``--max_restarts 1``) restarts the job through torchx, the job
resumes from the newest complete checkpoint and ends bitwise where the uninterrupted run ends.

The kill is made deterministic: once a checkpoint is on disk both workers are frozen (SIGSTOP),
the newest complete checkpoint is read, one worker gets SIGKILL and the other SIGCONT.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 48
# log_every=5 against checkpoint_every=4: the kill cuts a log window, whose partial sums the
# checkpoint must carry for the history to match; threads=1: 1x2 and 2x1 compute alike
OVERRIDES = ["data.batch_size=32", f"run.steps={STEPS}", "model.tower=[16,8]", "scn.sync_every=5",
             "selector.update_every=4", "run.max_eval_rows=512", "run.checkpoint_every=4", "run.log_every=5",
             "run.threads=1"]
EXPECT = ("torchrun restarts both ranks; they resume from the newest complete checkpoint; exit 0 with the "
          "uninterrupted run's metrics and history, bitwise")
SAME = ("target_test", "target_valid", "selector", "reward_mean", "steps", "syncs", "selector_updates",
        "world_size")


def _launch(tiny_data, run_dir, j, port, max_restarts=0):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = ["torchx", "run", "-s", "local_cwd", "launch/components.py:train", "--j", j, "--config",
           "configs/cctl_tiny.yaml", "--data", tiny_data, "--run_dir", str(run_dir), "--rdzv_port", str(port),
           "--max_restarts", str(max_restarts), "--", *OVERRIDES]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("the job did not finish in time (hung after the kill?):\n" + out[-5000:])
    return proc.returncode, out


def _comparable(metrics):
    m = {k: metrics[k] for k in SAME}
    m["history"] = [{k: v for k, v in row.items() if k != "ex_per_s"} for row in metrics["history"]]
    return m


def _workers(run_dir):
    """{RANK: pid} of the training processes of ``run_dir`` (not torchx, bash or torchrun)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if "cctl_rec.cli" not in argv or str(run_dir) not in argv or any(a.endswith("torchrun") for a in argv) \
                    or not os.path.basename(argv[0]).startswith("python"):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
        except OSError:  # gone meanwhile
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def _complete_checkpoints(run_dir):
    d = run_dir / "checkpoints"
    return sorted(int(m.group(1)) for n in (os.listdir(d) if d.is_dir() else [])
                  if (m := re.match(r"^step-(\d{8})$", n)) and (d / n / "trainer.json").exists())


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fault") / "full"
    rc, out = _finish(_launch(tiny_data, run_dir, "1x2", 29620))
    assert rc == 0, out[-5000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("j,port,victim", [
    pytest.param("1x2", 29621, 1, marks=pytest.mark.reliability(
        "fault", "kill -9 of rank 1 mid-run, 1 node x 2 ranks, torchx --max_restarts 1", expect=EXPECT)),
    pytest.param("2x1", 29622, 0, marks=pytest.mark.reliability(
        "fault", "kill -9 of rank 0 mid-run, 2 nodes x 1 rank (c10d rendezvous), torchx --max_restarts 1",
        expect=EXPECT)),
])
def test_killed_rank_restarts_and_resumes_to_the_same_result(tiny_data, tmp_path, uninterrupted, j, port, victim):
    run_dir = tmp_path / "run"
    proc = _launch(tiny_data, run_dir, j, port, max_restarts=1)
    try:
        deadline = time.monotonic() + 300
        while not _complete_checkpoints(run_dir):
            assert proc.poll() is None, "the job ended before its first checkpoint:\n" + proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        workers = _workers(run_dir)
        assert sorted(workers) == [0, 1], workers
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        while not all(_stopped(pid) for pid in workers.values()):
            time.sleep(0.01)
        done = _complete_checkpoints(run_dir)  # frozen: nothing completes meanwhile
        assert done[-1] < STEPS and not (run_dir / "metrics.json").exists(), "killed too late to test a resume"
        os.kill(workers[victim], signal.SIGKILL)
        os.kill(workers[1 - victim], signal.SIGCONT)
    except BaseException:
        proc.kill()
        raise
    rc, out = _finish(proc)
    assert rc == 0, out[-5000:]
    assert re.search(rf"\(exitcode: -9\) local_rank: \d+ \(pid: {workers[victim]}\)", out), \
        "torchrun did not see the kill:\n" + out[-5000:]
    assert f"resumed from {run_dir}/checkpoints/step-{done[-1]:08d} at step {done[-1]}" in out, out[-5000:]
    after = _workers(run_dir)
    assert not after, f"workers left behind: {after}"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["resumed_from_step"] == done[-1] and m["steps"] == STEPS
    assert _complete_checkpoints(run_dir)[-1] == STEPS
    assert _comparable(m) == _comparable(uninterrupted)  # bitwise: every float equal
