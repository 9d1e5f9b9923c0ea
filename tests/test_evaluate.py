"""CTR metrics in metrics.json, and `cctl-rec evaluate`: any checkpoint of a run on any target split."""

import json

import pytest

from cctl_rec.cli import main
from tests.tinydata import write_tiny

BASE = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.log_every=4",
        "scn.sync_every=6", "selector.update_every=4", "run.max_eval_rows=0"]
KEYS = {"auc", "logloss", "ne", "calibration", "ctr", "gauc", "gauc_users"}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A CCTL run (checkpoints at steps 4, 8 and the final 10) and a DNN run (6 steps)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "--data", tiny_data, "--run-dir", str(root / "cctl"), *BASE, "run.steps=10",
                 "run.checkpoint_every=4", "run.keep_checkpoints=5"]) == 0
    assert main(["train", "--data", tiny_data, "--run-dir", str(root / "dnn"), *BASE, "run.steps=6",
                 "model.name=dnn"]) == 0
    return root


def _evaluate(capsys, *args):
    rc = main(["evaluate", *args])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out.strip().splitlines()[-1]) if rc == 0 else cap.err)


def test_metrics_json_keeps_its_keys_and_adds_the_ctr_metrics(runs):
    m = json.loads((runs / "cctl" / "metrics.json").read_text())
    for split in ("target_test", "target_valid"):
        assert set(m[split]) == KEYS, split
        s = m[split]
        assert 0 < s["ne"] < 2 and s["calibration"] > 0 and 0 < s["ctr"] < 1 and s["gauc_users"] > 0
        assert 0 <= s["gauc"] <= 1


@pytest.mark.parametrize("run", ["cctl", "dnn"])
def test_evaluate_latest_equals_the_runs_own_test_metrics(runs, tiny_data, capsys, run):
    rc, got = _evaluate(capsys, "--run-dir", str(runs / run), "--data", tiny_data, "--split", "tgt/test")
    assert rc == 0, got
    want = json.loads((runs / run / "metrics.json").read_text())["target_test"]
    final = json.loads((runs / run / "checkpoints" / f"step-{got['step']:08d}" / "trainer.json").read_text())
    assert got["network"] == ("mixed" if run == "cctl" and not final.get("final") else "pure")
    assert got["rows"] == 1024
    assert got["step"] == (10 if run == "cctl" else 6) and got["split"] == "tgt/test"
    for k in KEYS:  # the served network, unsharded, scored like training scored it
        assert got[k] == pytest.approx(want[k], abs=2e-5), k


def test_evaluate_scores_an_older_checkpoint_on_another_split(runs, tiny_data, capsys, tmp_path):
    out = tmp_path / "eval.json"
    rc, step4 = _evaluate(capsys, "--run-dir", str(runs / "cctl"), "--data", tiny_data, "--split", "tgt/valid",
                          "--checkpoint", "4", "--network", "pure", "--out", str(out))
    assert rc == 0, step4
    assert step4["step"] == 4 and step4["network"] == "pure" and step4["split"] == "tgt/valid"
    assert json.loads(out.read_text()) == step4
    _, latest = _evaluate(capsys, "--run-dir", str(runs / "cctl"), "--data", tiny_data, "--split", "tgt/valid",
                          "--network", "pure")
    assert latest["step"] == 10 and latest["auc"] != step4["auc"]


@pytest.mark.parametrize("args, msg", [
    (["--checkpoint", "7"], "has no complete checkpoint of step 7; it has steps [4, 8, 10]"),
    (["--checkpoint", "best!"], "--checkpoint must be 'latest', 'best' or a step number, got 'best!'"),
    (["--split", "src/train"], "expected a tgt/* split"),
    (["--split", "tgt/nope"], "--split tgt/nope: dataset"),
])
def test_evaluate_bad_input_is_one_line_exit_2(runs, tiny_data, capsys, args, msg):
    rc, err = _evaluate(capsys, "--run-dir", str(runs / "cctl"), "--data", tiny_data, *args)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_refuses_a_dataset_of_another_schema_and_a_missing_run(runs, tiny_data, capsys, tmp_path):
    import tests.tinydata as td

    other = tmp_path / "other"
    old = td.N_USERS
    try:
        td.N_USERS = old + 7  # same columns, a larger user table
        write_tiny(str(other), n_tgt=512, n_src=512)
    finally:
        td.N_USERS = old
    rc, err = _evaluate(capsys, "--run-dir", str(runs / "cctl"), "--data", str(other))
    assert rc == 2 and "target schema differs" in err
    rc, err = _evaluate(capsys, "--run-dir", str(tmp_path / "nope"), "--data", tiny_data)
    assert rc == 2 and "does not exist; expected a cctl-rec run directory" in err


def test_eval_table_shows_ne_gauc_and_calibration(runs, capsys):
    assert main(["eval", str(runs / "cctl")]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    t = json.loads((runs / "cctl" / "metrics.json").read_text())["target_test"]
    assert cells["test NE"] == f"{t['ne']:.4f}" and cells["test GAUC"] == f"{t['gauc']:.4f}"
    assert cells["test calibration"] == f"{t['calibration']:.4f}"


def test_best_checkpoint_is_kept_apart_and_evaluate_and_export_take_it(runs, tiny_data, capsys, tmp_path):
    import shutil

    from cctl_rec.train.best import improves, keep_best, read_best

    run = tmp_path / "run"
    shutil.copytree(runs / "cctl", run)
    rc, err = _evaluate(capsys, "--run-dir", str(run), "--data", tiny_data, "--checkpoint", "best")
    assert rc == 2 and "has no best checkpoint; train with run.keep_best=true" in err
    assert improves(str(run), 0.5) and not improves(str(run), None)
    keep_best(str(run), 4, 0.61, str(run / "checkpoints" / "step-00000004"))
    assert read_best(str(run))["step"] == 4 and not improves(str(run), 0.61) and improves(str(run), 0.62)
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # pruned by keep_checkpoints: the best copy stays
    _, best = _evaluate(capsys, "--run-dir", str(run), "--data", tiny_data, "--split", "tgt/valid",
                        "--checkpoint", "best")
    _, step4 = _evaluate(capsys, "--run-dir", str(runs / "cctl"), "--data", tiny_data, "--split", "tgt/valid",
                         "--checkpoint", "4", "--network", "pure")
    assert best["step"] == 4 and best["network"] == "pure" and best["auc"] == step4["auc"]
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "m"), "--checkpoint", "best"]) == 0
    meta = json.loads((tmp_path / "m" / "serving.json").read_text())
    assert meta["step"] == 4 and meta["network"] == "pure"
