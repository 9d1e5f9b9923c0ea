"""The cluster path end to end on a real S3-compatible server on loopback (issue #18): datagen ->
2-rank torchx train -> checkpoint -> a killed rank -> torchrun restarts both -> resume -> export ->
predict, every path an ``s3://`` URL, ends equal to the same chain on local paths.

The server is moto's, in a thread of this process (the ``s3`` fixture of tests/test_storage.py);
the workers reach it through the AWS_* environment torchx passes on. The kill is made
deterministic as in tests/test_fault.py: once a checkpoint is complete on the bucket both
workers are frozen, rank 1 gets SIGKILL, rank 0 SIGCONT.
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cctl_rec.cli import main
from tests.test_fault import _comparable, _stopped, _workers
from tests.test_storage import s3  # noqa: F401  (the fixture)

boto3 = pytest.importorskip("boto3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
# checkpoint_every=4 against log_every=5: the kill cuts a log window; eval_every=8 with keep_best
# makes the resumed run write a best checkpoint; threads=1: 1x2 computes alike every time
OVERRIDES = ["data.batch_size=32", f"run.steps={STEPS}", "model.tower=[16,8]", "model.san_hidden=[16]",
             "scn.sync_every=5", "selector.update_every=4", "run.max_eval_rows=512", "run.checkpoint_every=4",
             "run.log_every=5", "run.eval_every=8", "run.keep_best=true", "run.threads=1"]
GEN = ["datagen", "--preset", "tiny", "--scale", "0.05", "--workers", "1", "--seed", "5"]


def _keys(prefix):
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket="cctl", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(key):
    return boto3.client("s3").get_object(Bucket="cctl", Key=key)["Body"].read()


def _complete(prefix):
    """Steps of the complete checkpoints (trainer.json written) under ``prefix``checkpoints/."""
    return sorted(int(m.group(1)) for k in _keys(prefix + "checkpoints/")
                  if (m := re.fullmatch(re.escape(prefix) + r"checkpoints/step-(\d{8})/trainer\.json", k)))


def _launch(data, run_dir, port, max_restarts=0):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = ["torchx", "run", "-s", "local_cwd", "launch/components.py:train", "--j", "1x2", "--config",
           "configs/cctl_tiny.yaml", "--data", data, "--run_dir", run_dir, "--rdzv_port", str(port),
           "--max_restarts", str(max_restarts), "--", *OVERRIDES]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, run_dir, timeout=900):
    """The job's exit code and output; on a timeout every worker's Python stacks (kill -USR1)
    are in the failure message: where a rank waits."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _workers(run_dir).values():
            os.kill(pid, signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        out, _ = proc.communicate()
        for pid in _workers(run_dir).values():
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the job did not finish in {timeout} s; its output with the workers' stacks:\n{out[-20000:]}")
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.dist
def test_killed_rank_on_s3_resumes_exports_and_predicts_like_the_local_run(s3, tmp_path, capsys):
    s3.setenv("CCTL_REC_CACHE", str(tmp_path / "cache"))  # this test's staging and download cache
    local_data, remote_data = str(tmp_path / "data"), "s3://cctl/e2e/data"
    for out in (local_data, remote_data):
        assert main([*GEN, "--out", out]) == 0
    # the local chain, uninterrupted
    local_run = str(tmp_path / "run")
    rc, out = _finish(_launch(local_data, local_run, 29751), local_run)
    assert rc == 0, out[-5000:]
    # the s3 chain: rank 1 killed once a checkpoint is complete on the bucket
    run = "s3://cctl/e2e/run"
    proc = _launch(remote_data, run, 29752, max_restarts=1)
    try:
        deadline = time.monotonic() + 600
        while not _complete("e2e/run/"):
            assert proc.poll() is None, "the job ended before its first checkpoint:\n" + proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint on the bucket after 600 s"
            time.sleep(0.1)
        workers = _workers(run)
        assert sorted(workers) == [0, 1], workers
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        while not all(_stopped(pid) for pid in workers.values()):
            time.sleep(0.01)
        done = _complete("e2e/run/")  # frozen: nothing completes meanwhile
        assert done[-1] < STEPS and "e2e/run/metrics.json" not in _keys("e2e/run/"), "killed too late"
        os.kill(workers[1], signal.SIGKILL)
        os.kill(workers[0], signal.SIGCONT)
    except BaseException:
        proc.kill()
        raise
    rc, out = _finish(proc, run)
    assert rc == 0, out[-5000:]
    assert re.search(rf"\(exitcode: -9\) local_rank: 1 \(pid: {workers[1]}\)", out), out[-5000:]
    assert f"resumed from {run}/checkpoints/step-{done[-1]:08d} at step {done[-1]}" in out, out[-5000:]
    assert not _workers(run)
    m = json.loads(_get("e2e/run/metrics.json"))
    local = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["resumed_from_step"] == done[-1] and m["steps"] == STEPS == local["steps"]
    assert _comparable(m) == _comparable(local)  # bitwise: every float equal
    assert m["best_checkpoint"] == local["best_checkpoint"]
    # each rank's log on the bucket, both attempts in it
    logs = {r: _get(f"e2e/run/logs/rank{r}.log").decode() for r in (0, 1)}
    assert logs[0].count(f"rank 0 of 2, run directory {run}") == 2 == logs[1].count(f"rank 1 of 2, run directory {run}")
    assert f"resumed from {run}/checkpoints/step-{done[-1]:08d}" in logs[0]
    assert f"done: {STEPS} steps in" in logs[0]
    # what was said before the run directory was there (sharding), TorchRec's repeats once per attempt
    assert logs[1].count("Sharding Type is data_parallel, caching params will be ignored") == 2
    # export (the best checkpoint too) and predict with every path a URL == the local export and predict
    for which in ("latest", "best"):
        assert main(["export", "--run-dir", run, "--out", f"s3://cctl/e2e/model-{which}", "--checkpoint", which]) == 0
        assert main(["export", "--run-dir", local_run, "--out", str(tmp_path / f"model-{which}"),
                     "--checkpoint", which]) == 0
        assert main(["predict", "--model", f"s3://cctl/e2e/model-{which}", "--data", remote_data + "/tgt/test",
                     "--out", f"s3://cctl/e2e/pred-{which}.parquet", "--reserved-columns", "user_id"]) == 0
        assert main(["predict", "--model", str(tmp_path / f"model-{which}"), "--data", local_data + "/tgt/test",
                     "--out", str(tmp_path / f"pred-{which}.parquet"), "--reserved-columns", "user_id"]) == 0
        import pyarrow.parquet as pq

        got = pq.read_table(io.BytesIO(_get(f"e2e/pred-{which}.parquet")))
        want = pq.read_table(tmp_path / f"pred-{which}.parquet")
        assert got.num_rows == want.num_rows == sum(
            e["rows"] for e in json.loads((tmp_path / "data" / "manifest.json").read_text())["splits"]["tgt/test"])
        assert got.column("logit").to_pylist() == want.column("logit").to_pylist(), which
        assert got.column("user_id").to_pylist() == want.column("user_id").to_pylist()
    serving = {w: json.loads(_get(f"e2e/model-{w}/serving.json")) for w in ("latest", "best")}
    assert serving["latest"]["step"] == STEPS and serving["best"]["step"] == m["best_checkpoint"]["step"]
    capsys.readouterr()
