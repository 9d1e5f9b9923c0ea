"""`cctl-rec experiment`: models x seeds end to end on tiny data, the report, resuming, failures."""

import json

import pytest

from cctl_rec.cli import main
from cctl_rec.experiment.spec import load_spec

FAST = ["data.batch_size=64", "run.steps=6", "model.tower=[8]", "run.max_eval_rows=256", "run.log_every=2",
        "scn.sync_every=3", "selector.update_every=2"]


def _spec(tmp_path, tiny_data, models, extra=""):
    p = tmp_path / "exp.yaml"
    lines = ["name: t", "seeds: [0, 1]", "datasets:", f"  tiny: {{path: {tiny_data}}}",
             f"overrides: {json.dumps(FAST)}", "models:"]
    lines += [f"  - {{name: {n}, config: configs/cctl_tiny.yaml, overrides: {json.dumps(o)}}}" for n, o in models]
    p.write_text("\n".join(lines) + "\n" + extra)
    return str(p)


@pytest.mark.slow  # runs in spawned worker processes
def test_experiment_runs_every_model_and_seed_and_writes_the_report(tmp_path, tiny_data, capsys):
    cfg = _spec(tmp_path, tiny_data, [("DNN", ["model.name=dnn"]), ("CCTL (paper)", [])],
                "alpha_sweep: {model: CCTL (paper), values: [0.0, 1.0]}\npaper: {DNN: 0.7456}\n")
    out = tmp_path / "out"
    assert main(["experiment", "--config", cfg, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    # alpha=1.0 is the model's own setting: its runs give that point of the sweep
    assert len(runs) == 2 * 2 + 1 * 2 and all(r["status"] == "ok" for r in runs)
    s = res["summary"]["tiny"]
    assert s["models"]["DNN"]["seeds"] == [0, 1] and len(s["models"]["CCTL (paper)"]["auc"]) == 2
    assert set(s["alpha_sweep"]) == {"0", "1"}
    # the two seeds differ (the seed reaches the run) and the alpha=0 runs differ from alpha=1
    assert s["models"]["DNN"]["auc"][0] != s["models"]["DNN"]["auc"][1]
    md = (out / "report.md").read_text()
    assert f"Command: `cctl-rec experiment --config {cfg} --out {out}`" in md
    assert "| DNN | " in md and "0.7456" in md and "| CCTL (paper) | " in md
    for png in ("tiny-auc-vs-alpha.png", "tiny-learning-curves.png", "tiny-p-histogram.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    # a rerun skips finished runs: same numbers, no new training
    mtime = (out / "runs/tiny/dnn/seed0/metrics.json").stat().st_mtime
    assert main(["experiment", "--config", cfg, "--out", str(out), "--only", "DNN"]) == 0
    assert (out / "runs/tiny/dnn/seed0/metrics.json").stat().st_mtime == mtime


@pytest.mark.slow  # runs in spawned worker processes
def test_a_failing_run_is_reported_and_the_rest_still_run(tmp_path, tiny_data, capsys):
    cfg = _spec(tmp_path, tiny_data, [("bad", ["selector.gamma=7"]), ("DNN", ["model.name=dnn"])])
    out = tmp_path / "out"
    assert main(["experiment", "--config", cfg, "--out", str(out), "--seeds", "0"]) == 1
    runs = json.loads((out / "results.json").read_text())["runs"]
    bad = [r for r in runs if r["model"] == "bad"][0]
    assert bad["status"] == "failed" and "selector.gamma" in bad["error"]
    assert [r["status"] for r in runs if r["model"] == "DNN"] == ["ok"]


@pytest.mark.parametrize("body,msg", [
    ("name: x\nmodels: []\ndatasets: {a: {path: p}}\n", "at least one model"),
    ("name: x\nmodels: [{name: A, config: nope.yaml}]\ndatasets: {a: {path: p}}\n", "nope.yaml does not exist"),
    ("name: x\nmodels: [{name: A, config: configs/cctl_tiny.yaml}]\ndatasets: {a: {path: p}}\nseedz: [1]\n",
     "unknown key(s) ['seedz']"),
    ("name: x\nmodels: [{name: A, config: configs/cctl_tiny.yaml}]\ndatasets: {a: {path: p}}\n"
     "alpha_sweep: {model: B, values: [0]}\n", "alpha_sweep.model 'B'"),
    ("name: x\nmodels: [{name: A, config: configs/cctl_tiny.yaml, seeds: 3}]\ndatasets: {a: {path: p}}\n",
     "models[0].seeds must be a non-empty list"),
    ("name: x\nseeds: [0, 1]\nmodels: [{name: A, config: configs/cctl_tiny.yaml, seeds: [7]}]\n"
     "datasets: {a: {path: p}}\n", "seeds [7] are none of its datasets' seeds"),
])
def test_bad_experiment_configs_are_one_line(tmp_path, capsys, body, msg):
    p = tmp_path / "e.yaml"
    p.write_text(body)
    assert main(["experiment", "--config", str(p), "--out", str(tmp_path / "o")]) == 2
    assert msg in capsys.readouterr().err


def test_the_provided_experiments_load():
    import glob

    for path in glob.glob("configs/experiments/*.yaml"):
        spec = load_spec(path)
        assert spec.models and spec.datasets, path


def test_a_model_runs_only_its_seeds_of_each_dataset(tmp_path):
    from cctl_rec.experiment.runner import plan_runs

    cfg = tmp_path / "e.yaml"
    cfg.write_text("name: x\nseeds: [0, 1, 2, 3]\ndatasets:\n  a: {path: p}\n  dense: {path: q, seeds: [0]}\n"
                   "models:\n  - {name: A, config: configs/cctl_tiny.yaml}\n"
                   "  - {name: B, config: configs/cctl_tiny.yaml, seeds: [0, 1]}\n")
    runs = [(r.dataset.name, r.model.name, r.seed) for r in plan_runs(load_spec(str(cfg)))]
    assert runs == [("a", "A", 0), ("a", "A", 1), ("a", "A", 2), ("a", "A", 3), ("a", "B", 0), ("a", "B", 1),
                    ("dense", "A", 0), ("dense", "B", 0)]
