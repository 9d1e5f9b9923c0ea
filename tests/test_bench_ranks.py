"""`cctl-rec bench stress --stress-world N`: the checked run on N gloo ranks."""

import json

import pytest

from cctl_rec.cli import main


@pytest.mark.dist  # spawned gloo ranks
def test_bench_stress_on_two_ranks_checks_every_rank(tiny_data, tmp_path):
    out = tmp_path / "stress.json"
    rc = main(["bench", "stress", "--data", tiny_data, "--stress-steps", "22", "--sync-every", "1",
               "--update-every", "1", "--rss-every", "1", "--stress-world", "2", "--out", str(out),
               "data.batch_size=64", "model.tower=[16,8]"])
    res = json.loads(out.read_text())
    r = res["results"]
    assert rc == 0 and not r["failures"] and all(t["met"] for t in res["targets"]), res["targets"]
    assert r["world_size"] == 2 and [x["rank"] for x in r["ranks"]] == [0, 1]
    # 22 per rank; k = 1: each step after the first follows a sync, its reward checked for 0
    assert r["checks"] == {"steps": 44, "updates_checked": 44, "syncs_checked": 44, "rewards_after_sync_checked": 42}
    assert all(x["syncs"] == x["selector_updates"] == 22 for x in r["ranks"])
    assert "of 2 gloo ranks, every rank checked" in (tmp_path / "stress.md").read_text()


def test_bench_stress_world_must_be_positive(tiny_data, tmp_path, capsys):
    rc = main(["bench", "stress", "--data", tiny_data, "--stress-world", "0", "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--stress-world must be >= 1, got 0" in err, err
