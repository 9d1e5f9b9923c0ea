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


@pytest.mark.dist  # four spawned gloo ranks
def test_bench_scaling_on_four_ranks_counts_every_rank_and_the_sync_stays_local(tiny_data, tmp_path):
    out = tmp_path / "scaling.json"
    rc = main(["bench", "scaling", "--data", tiny_data, "--world-sizes", "4", "--steps", "2", "--warmup", "1",
               "--repeats", "1", "--out", str(out), "data.batch_size=64", "model.tower=[16,8]"])
    res = json.loads(out.read_text())
    r = res["results"]["4"]
    assert rc == 0 and list(res["results"]) == ["4"] and len(r["ranks"]) == 4
    assert r["global_target_rows_per_step"] == 4 * r["ranks"][0]["target_rows"] == 4 * 64
    for x in r["ranks"]:  # every rank exchanges ids and pooled rows with the others, and its sync sends nothing
        assert any(k.startswith("forward/alltoall") for k in x["per_step"]), x["per_step"]
        assert sum(e["sent_bytes"] for e in x["per_step"].values()) > 0
        assert sum(e["sent_bytes"] for e in x["sync"].values()) == 0
    placed = {rk for tables in r["ranks"][0]["plan"].values() for p in tables.values() for rk in (p["ranks"] or [])}
    assert len(placed) > 1, r["ranks"][0]["plan"]  # the planner spreads the tables over the four ranks
    assert [t["met"] for t in res["targets"]] == [True]
