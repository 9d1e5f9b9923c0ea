"""The CLI lists its subcommands, documents each, and turns user mistakes into one line + exit 2."""

import subprocess
import sys

import pytest

from cctl_rec.cli import COMMANDS, main


@pytest.mark.slow  # a fresh interpreter (subprocess) imports every command
def test_help_lists_every_subcommand():
    r = subprocess.run([sys.executable, "-m", "cctl_rec.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in COMMANDS:
        assert name in r.stdout
    assert set(COMMANDS) >= {"datagen", "train", "eval", "export", "predict", "doctor"}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and "usage: cctl-rec " + name in capsys.readouterr().out


def test_eval_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.json does not exist" in err[0]


def test_doctor_reports_the_tested_stack(capsys):
    assert main(["doctor"]) == 0
    assert "OK (tested combination)" in capsys.readouterr().out


@pytest.mark.slow  # generation in spawned worker processes
def test_bench_datagen_measures_real_generation(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "datagen", "--preset", "tiny", "--rows", "30000", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] >= 30000 and res["gen_rows_per_s_per_worker"] > 0
    assert res["gen_write_rows_per_s_per_worker"] > 0 and res["peak_rss_mib"] > 0 and res["bytes_per_row"] > 0
    assert main(["bench", "datagen", "--preset", "huge"]) == 2


def _metrics(auc, groups=None):
    return {"model": "cctl/paper", "steps": 10, "world_size": 1, "train_samples_per_s": 100.0,
            "target_test": {"auc": auc, "logloss": 0.5}, "target_valid": {"auc": auc, "logloss": 0.5},
            "selector": None, "reward_mean": None, "target_test_groups": groups, "target_valid_groups": groups}


def _write_run(path, m):
    import json

    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(m))
    return str(path)


def test_eval_by_seed_groups_an_experiments_models_apart(tmp_path, capsys):
    """Issue 16: an experiment writes DATASET/MODEL/seed<k>; --by-seed grouped on the name minus
    '-s<k>' only, so every model's seed0 became one group."""
    runs = [_write_run(tmp_path / "exp" / ds / model / f"seed{s}", _metrics(auc))
            for ds, model, s, auc in (("amazon", "dnn", 0, 0.80), ("amazon", "dnn", 1, 0.82),
                                      ("amazon", "mix", 0, 0.70), ("amazon", "mix", 1, 0.72),
                                      ("phone", "dnn", 0, 0.60))]
    runs += [_write_run(tmp_path / "flat" / f"cctl-s{s}", _metrics(0.5 + s / 10)) for s in (0, 1)]
    assert main(["eval", "--by-seed", *runs]) == 0
    rows = {ln.split("|")[1].strip(): ln.split("|")[2:4] for ln in capsys.readouterr().out.splitlines()[2:]}
    assert {k: (int(v[0]), v[1].strip()) for k, v in rows.items()} == {
        "exp/amazon/dnn": (2, "0.8100 ± 0.0141"), "exp/amazon/mix": (2, "0.7100 ± 0.0141"),
        "exp/phone/dnn": (1, "0.6000 ± 0.0000"), "flat/cctl": (2, "0.5500 ± 0.0707")}
    from cctl_rec.commands.eval import seed_group

    assert seed_group("x/amazon/cctl/alpha0.5/seed3") == "x/amazon/cctl/alpha0.5"
    assert seed_group("runs/dnn-s4") == "runs/dnn" and seed_group("seed0") == "."


def test_eval_shows_cold_and_warm_auc_when_the_runs_have_them(tmp_path, capsys):
    groups = {"cold": {"auc": 0.61, "logloss": 0.6, "rows": 10}, "warm": {"auc": None, "logloss": 0.4, "rows": 5}}
    a = _write_run(tmp_path / "a", _metrics(0.7, groups))
    b = _write_run(tmp_path / "b", _metrics(0.8))
    assert main(["eval", a, b]) == 0
    out = capsys.readouterr().out.splitlines()
    head = [c.strip() for c in out[0].split("|")]
    assert head[5:8] == ["test AUC", "test AUC cold", "test AUC warm"]
    assert [c.strip() for c in out[2].split("|")][1:7] == ["a", "cctl/paper", "10", "1", "0.7000", "0.6100"]
    assert [c.strip() for c in out[2].split("|")][7] == "n/a" and [c.strip() for c in out[3].split("|")][6] == "n/a"
    assert main(["eval", b]) == 0
    assert "cold" not in capsys.readouterr().out  # no groups in any run: no columns
    assert main(["eval", "--by-seed", a]) == 0
    assert "0.6100 ± 0.0000" in capsys.readouterr().out
