"""The CLI lists its subcommands, documents each, and turns user mistakes into one line + exit 2."""

import subprocess
import sys

import pytest

from cctl_rec.cli import COMMANDS, main


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


def test_bench_datagen_measures_real_generation(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "datagen", "--preset", "tiny", "--rows", "30000", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] >= 30000 and res["gen_rows_per_s_per_worker"] > 0
    assert res["gen_write_rows_per_s_per_worker"] > 0 and res["peak_rss_mib"] > 0 and res["bytes_per_row"] > 0
    assert main(["bench", "datagen", "--preset", "huge"]) == 2
