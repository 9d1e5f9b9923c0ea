"""`cctl-rec bench stress --preset meituan --scale-ids F`: the design card's stress (issue #21) on a
short scale: the Meituan preset's id spaces generated at F = 1e-4, k and the selector window 2
(the full run uses the paper's 1000), 20 of each on 2 gloo ranks, every invariant checked on every
rank; a broken sync fails it on every rank; bad input is one line, exit 2, nothing generated."""

import json

import pytest

from cctl_rec.cli import main

F = "0.0001"
SHORT = ["--stress-steps", "40", "--sync-every", "2", "--update-every", "2", "--rss-every", "2",
         "--stress-world", "2", "data.batch_size=32", "model.tower=[16,8]"]


@pytest.fixture(scope="module")
def meituan_dir(tmp_path_factory) -> str:
    """Where the tests' `--preset meituan --scale-ids 1e-4` data lives: the first test to run
    generates it through `bench stress`, the next one reuses it."""
    return str(tmp_path_factory.mktemp("meituan") / "data")


def _run(data, out, *extra):
    rc = main(["bench", "stress", "--preset", "meituan", "--scale-ids", F, "--data", data, "--out", str(out),
               *SHORT, *extra])
    return rc, json.loads(out.read_text())


@pytest.mark.dist  # spawned gloo ranks (and datagen's worker pool)
def test_meituan_stress_on_two_ranks_checks_every_invariant(meituan_dir, tmp_path):
    from cctl_rec.datagen.presets import resolve

    rc, res = _run(meituan_dir, tmp_path / "stress.json")
    r = res["results"]
    assert rc == 0 and not r["failures"] and all(t["met"] for t in res["targets"]), res["targets"]
    want = resolve("meituan", float(F), True)
    assert r["preset"]["tables"]["tgt/user_id"] == want.n_users and r["preset"]["rows"]["tgt/train"] == 20_000
    assert "--preset meituan --scale-ids 0.0001" in res["command"]
    # 40 steps, k = window = 2: 20 syncs and 20 updates per rank, each checked, and the 19 steps
    # that follow a sync (not the one after the last step's) checked for reward 0, on both ranks
    assert all(x["syncs"] == x["selector_updates"] == 20 for x in r["ranks"])
    assert r["checks"] == {"steps": 80, "updates_checked": 40, "syncs_checked": 40, "rewards_after_sync_checked": 38}
    assert r["max_abs_reward_after_sync"] == 0.0  # pure == mixed: the same loss, bitwise
    assert r["rss"]["growth"] is not None and [p[0] for p in r["ranks"][1]["rss_curve"]][::10] == [0, 20, 40]
    md = (tmp_path / "stress.md").read_text()
    assert "datagen --preset meituan --scale 0.0001 --scale-ids" in md and "| step | rank 0 | rank 1 |" in md


def _rank_with_broken_sync(rank, world, init_file, opts, out_dir):
    """A stress rank whose mixed -> pure sync copies nothing (patched inside the spawned process)."""
    import cctl_rec.train.trainer as trainer
    from cctl_rec.bench.stress import _rank_main

    trainer.sync_mixed_to_pure = lambda *a, **k: None
    _rank_main(rank, world, init_file, opts, out_dir)


@pytest.mark.dist  # spawned gloo ranks (and datagen's worker pool)
def test_meituan_stress_fails_on_a_broken_sync_on_every_rank(meituan_dir, tmp_path, monkeypatch, capsys):
    import cctl_rec.bench.stress as stress

    monkeypatch.setattr(stress, "_rank_main", _rank_with_broken_sync)
    rc, res = _run(meituan_dir, tmp_path / "stress.json")
    fails = res["results"]["failures"]
    assert rc == 1 and "failed" in capsys.readouterr().err
    for rank in (0, 1):
        mine = [f for f in fails if f.startswith(f"rank {rank}: ")]
        assert any("pure != mixed right after the sync" in f for f in mine), mine
        assert any("right after the sync at step 2, expected 0" in f for f in mine), mine
    met = {t["name"]: t["met"] for t in res["targets"]}
    assert met["reward right after each sync"] is False and met["syncs"] is True


@pytest.mark.parametrize("args, message", [
    (["--scale-ids", "0"], "--scale-ids must be a finite number > 0, got 0.0"),
    (["--scale-ids", "-0.5"], "--scale-ids must be a finite number > 0, got -0.5"),
    (["--scale-ids", "1e-9"], "leaving tgt/valid with 0 rows"),
    (["--scale-ids", F, "--stress-steps", "19999"],
     "--stress-steps 19999 holds 19 syncs (k = 1000) and 19 selector updates (window 1000); expected at least 20 "
     "of each: --stress-steps >= 20000"),
    (["--scale-ids", F, "--stress-steps", "100", "--sync-every", "5", "--update-every", "10"],
     "expected at least 20 of each: --stress-steps >= 200"),
])
def test_meituan_stress_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    data = tmp_path / "m"
    rc = main(["bench", "stress", "--preset", "meituan", "--data", str(data), "--out", str(tmp_path / "s.json"),
               *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not data.exists() and not (tmp_path / "s.json").exists()


def test_meituan_stress_refuses_another_dataset_in_data(tiny_data, tmp_path, capsys):
    rc = main(["bench", "stress", "--preset", "meituan", "--scale-ids", F, "--data", tiny_data,
               "--out", str(tmp_path / "s.json"), *SHORT])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"--data {tiny_data} holds another dataset (preset test" in err[0], err
    assert "expected --preset meituan --scale-ids 0.0001" in err[0]
