"""A rank killed among 4 (1 node x 4 gloo ranks, torchx --max_restarts 1): torchrun restarts the
whole group, the ranks resume from the newest complete checkpoint and end where the uninterrupted
4-rank run ends (the 2-rank case and the helpers: tests/test_fault.py).

Not bitwise, unlike 2 ranks: measured for #21, two uninterrupted 4-rank runs are bitwise equal but
the resumed one differs in the 9th significant digit (NE, the selector's p_std). With 2 ranks a sum
is a + b in either order; with 4, gloo's ring all-reduce adds each element in an order set by its
position in DDP's gradient buckets, which the restarted group rebuilds on its own (the likely
cause; not isolated). Floats are compared to 1e-6 relative, everything else exactly.
"""

import json
import os
import re
import signal
import time

import pytest

from tests.test_world_sizes import _numbers

from tests.test_fault import _comparable, _complete_checkpoints, _finish, _launch, _stopped, _workers

VICTIM = 2  # neither rank 0 (writes the metadata) nor the last


@pytest.mark.dist
@pytest.mark.reliability("fault", "kill -9 of rank 2 mid-run, 1 node x 4 ranks, torchx --max_restarts 1",
                         expect="torchrun restarts all 4 ranks; they resume from the newest complete checkpoint; "
                                "exit 0 with the uninterrupted 4-rank run's metrics and history (floats to 1e-6)")
def test_rank_killed_among_four_restarts_and_resumes_to_the_same_result(tiny_data, tmp_path):
    rc, out = _finish(_launch(tiny_data, tmp_path / "full", "1x4", 29631))
    assert rc == 0, out[-5000:]
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    run_dir = tmp_path / "run"
    proc = _launch(tiny_data, run_dir, "1x4", 29632, max_restarts=1)
    try:
        deadline = time.monotonic() + 300
        while not _complete_checkpoints(run_dir):
            assert proc.poll() is None, "the job ended before its first checkpoint:\n" + proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        workers = _workers(run_dir)
        assert sorted(workers) == [0, 1, 2, 3], workers
        for pid in workers.values():
            os.kill(pid, signal.SIGSTOP)
        while not all(_stopped(pid) for pid in workers.values()):
            time.sleep(0.01)
        done = _complete_checkpoints(run_dir)  # frozen: nothing completes meanwhile
        assert done[-1] < full["steps"] and not (run_dir / "metrics.json").exists(), "killed too late"
        os.kill(workers[VICTIM], signal.SIGKILL)
        for rank, pid in workers.items():
            if rank != VICTIM:
                os.kill(pid, signal.SIGCONT)
    except BaseException:
        proc.kill()
        raise
    rc, out = _finish(proc)
    assert rc == 0, out[-5000:]
    assert re.search(rf"\(exitcode: -9\) local_rank: \d+ \(pid: {workers[VICTIM]}\)", out), \
        "torchrun did not see the kill:\n" + out[-5000:]
    assert f"resumed from {run_dir}/checkpoints/step-{done[-1]:08d} at step {done[-1]}" in out, out[-5000:]
    assert not _workers(run_dir), "workers left behind"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 4 and m["resumed_from_step"] == done[-1] and m["steps"] == full["steps"]
    a, b = _comparable(m), _comparable(full)
    assert len(a["history"]) == len(b["history"]) and [r["step"] for r in a["history"]] == \
        [r["step"] for r in b["history"]]
    got, want = _numbers(a), _numbers(b)
    got.update({f"/history/{i}{k}": v for i, row in enumerate(a["history"]) for k, v in _numbers(row).items()})
    want.update({f"/history/{i}{k}": v for i, row in enumerate(b["history"]) for k, v in _numbers(row).items()})
    assert got.keys() == want.keys()
    # the log windows' train_* CTR metrics included: the checkpoint carries every rank's open window
    bad = {k: (got[k], want[k]) for k in want if abs(got[k] - want[k]) > 1e-6 * max(1.0, abs(want[k]))}
    assert not bad, bad
