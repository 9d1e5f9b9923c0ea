"""Training CTR metrics per log window, and run.keep_best: the checkpoint with the best valid AUC
kept in RUN/best/, which evaluate and export take with --checkpoint best."""

import json

import pytest

from cctl_rec.cli import main

BASE = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "scn.sync_every=3",
        "run.max_eval_rows=0", "run.log_every=2", "run.eval_every=2", "run.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("best") / "run"
    # a large dense learning rate: valid AUC peaks mid-run (step 4 of 10), so the best is not the end
    assert main(["train", "--data", tiny_data, "--run-dir", str(d), *BASE, "run.steps=10", "run.keep_best=true",
                 "optim.dense_lr=0.5"]) == 0
    return d


def test_each_log_row_carries_the_windows_ctr_metrics(run):
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4, 6, 8, 10]
    for h in history:
        assert {"train_auc", "train_logloss", "train_ne", "train_calibration", "train_ctr"} <= set(h)
        assert 0 <= h["train_ctr"] <= 1 and h["train_logloss"] > 0
    assert len({h["train_logloss"] for h in history}) == len(history)  # each window scored on its own rows


def test_the_best_valid_auc_checkpoint_is_kept_and_served(run, tiny_data, capsys, tmp_path):
    m = json.loads((run / "metrics.json").read_text())
    # candidates: every eval step before the end (pure network then), and the served network at the end
    cands = [(h["valid_auc"], h["step"]) for h in m["history"] if h["step"] < m["steps"]]
    cands.append((m["target_valid"]["auc"], m["steps"]))
    best_auc, best_step = max(cands, key=lambda c: c[0])
    assert best_step < m["steps"]  # a mid-run checkpoint, since pruned from checkpoints/ (keep_checkpoints=1)
    assert not (run / "checkpoints" / f"step-{best_step:08d}").exists()
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["valid_auc"] == best_auc and best["network"] == "pure"
    assert m["best_checkpoint"] == {"step": best_step, "valid_auc": best_auc}
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "--data", tiny_data, "--split", "tgt/valid",
                 "--checkpoint", "best"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["step"] == best_step and got["auc"] == pytest.approx(best_auc, abs=2e-5)
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "m"), "--checkpoint", "best"]) == 0
    assert json.loads((tmp_path / "m" / "serving.json").read_text())["step"] == best_step


def test_a_resumed_run_starts_from_the_recorded_best(run, tmp_path):
    """best_so_far as train() calls it, under the process group every run initialises (one rank
    here): best.json's valid AUC, so a resumed run keeps a better best; None without a best."""
    import torch.distributed as dist

    from cctl_rec.distributed.env import init_distributed
    from cctl_rec.train.best import best_so_far

    init_distributed("cpu")  # what the run did (once per process)
    assert dist.is_initialized() and dist.get_world_size() == 1
    best = json.loads((run / "best" / "best.json").read_text())
    assert best_so_far(str(run)) == best["valid_auc"]
    assert best_so_far(str(tmp_path)) is None


def test_keep_best_needs_eval_every(tiny_data, tmp_path, capsys):
    rc = main(["train", "--data", tiny_data, "--run-dir", str(tmp_path / "r"), "run.keep_best=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "run.keep_best=true needs run.eval_every > 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
