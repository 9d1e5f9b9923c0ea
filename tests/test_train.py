"""`cctl-rec train` end to end on a micro dataset (1 process), its run directory and its errors."""

import json
import os

import pytest

from cctl_rec.cli import main

SMALL = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.log_every=5",
         "scn.sync_every=10", "selector.update_every=5", "run.max_eval_rows=512"]


def _train(tiny_data, run_dir, *extra):
    return main(["train", "--data", tiny_data, "--run-dir", str(run_dir), *SMALL, *extra])


def test_train_writes_the_run_directory(tiny_data, tmp_path, capsys):
    assert _train(tiny_data, tmp_path / "run", "run.steps=12", "selector.mode=paper") == 0
    files = set(os.listdir(tmp_path / "run"))
    assert {"config.yaml", "plan.json", "plan.txt", "metrics.json", "tb"} <= files
    assert not [f for f in files if ".tmp" in f]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["model"] == "cctl/paper" and m["steps"] == 12 and m["world_size"] == 1 and m["tower"] == "pure"
    assert 0.0 <= m["target_test"]["auc"] <= 1.0 and m["target_valid"]["logloss"] > 0
    assert set(m["selector"]) >= {"p_mean", "p_std", "harmful_auc"} and m["selector"]["harmful_auc"] is not None
    assert m["syncs"] == 2 and m["selector_updates"] == 2  # k=10 over 12 steps + the final sync
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["mixed_tgt"] == plan["pure_tgt"] and "src" in plan
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["target_test"] == m["target_test"]


def test_train_is_deterministic(tiny_data, tmp_path):
    for name in ("a", "b"):
        assert _train(tiny_data, tmp_path / name, "run.steps=8", "selector.mode=bernoulli") == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert a["target_test"] == b["target_test"] and a["selector"] == b["selector"]


@pytest.mark.parametrize("mode", ["fixed", "oracle", "supervised", "influence",
                                  "influence selector.influence_target=train_batch scn.reward_source=train_batch"])
def test_selector_modes_run(tiny_data, tmp_path, mode):
    """Each mode trains; the influence mode against a held-out batch (the default) and against the
    step's own target rows (train_batch, with the reward from them too: no held-out stream at all)."""
    name, *extra = mode.split()
    assert _train(tiny_data, tmp_path / "run", "run.steps=6", f"selector.mode={name}",
                  "scn.reward_source=heldout_batch", *extra) == 0


def test_dnn_baseline_has_no_source_parts(tiny_data, tmp_path):
    assert _train(tiny_data, tmp_path / "dnn", "run.steps=6", "model.name=dnn") == 0
    m = json.loads((tmp_path / "dnn" / "metrics.json").read_text())
    assert m["model"] == "dnn" and m["selector"] is None
    assert set(json.loads((tmp_path / "dnn" / "plan.json").read_text())) == {"pure_tgt"}
    # TensorBoard: the target network's tags only, none of CCTL's (reward, selector, mixed/source losses, REN)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "dnn" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"]) | set(acc.Tags()["histograms"])
    assert {"train/loss_pure", "train/train_logloss", "train/ex_per_s"} <= tags, tags
    assert not [t for t in tags if t.startswith(("scn/", "selector/")) or t.split("/")[-1] in (
        "loss_mixed", "loss_tgt", "loss_src", "loss_ren", "reward", "cos_id", "cos_seq", "p_mean", "p_clean",
        "p_harmful")], tags


@pytest.mark.parametrize("args,msg", [
    (["--data", "/nonexistent/data"], "/nonexistent/data"),
    (["dist.sharding=row_wise"], "dist.sharding=row_wise needs CUDA"),
    (["optim.sparse_optimizer=adam"], "adam is not supported by fbgemm's CPU TBE"),
    (["data.batch_size=100000"], "fewer than one batch of 100000"),
    (["selector.gamma=2"], "selector.gamma must be in [0, 1], got 2"),
    (["selector.mode=influence", "selector.influence_group=seq"],
     "selector.influence_group=seq: not a single-id source feature; expected one of user_id"),
    (["selector.mode=influence", "selector.influence_group_decay=1"], "selector.influence_group_decay must be in [0, 1)"),
])
def test_user_mistakes_exit_2_with_one_line(tiny_data, tmp_path, capsys, args, msg):
    rc = main(["train", "--data", tiny_data, "--run-dir", str(tmp_path / "r"), *SMALL, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("cctl-rec train: error: ") and msg in err[-1], err[-1]
    assert not (tmp_path / "r" / "metrics.json").exists()
