"""`cctl-rec plan`: dry-run plans of the whole CCTL model on meta tables, CPU and CUDA sharding types."""

import json

import pytest

from cctl_rec.cli import main


def _plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    rc = main(["plan", *args, "--out", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_meituan_on_16_gpus_plans_every_table_with_mirrored_target_tables(tmp_path):
    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "16", "--device", "cuda", "--hbm-gb", "80")
    assert rc == 0 and rep["fits"] and rep["uvm_tables"] == []
    mods = {t["module"] for t in rep["tables"]}
    assert mods == {"mixed_tgt", "pure_tgt", "src"}
    assert rep["plan"]["mixed_tgt"] == rep["plan"]["pure_tgt"]
    users = [t for t in rep["tables"] if t["table"].endswith("user_id")]
    assert {t["rows"] for t in users} == {users[0]["rows"]} and users[0]["rows"] > 200_000_000
    assert rep["total_gb"] == pytest.approx(sum(rep["per_rank_gb"]))
    # weights + rowwise Adagrad state of the three 289M-row user tables alone
    assert rep["total_gb"] >= 3 * users[0]["rows"] * (8 + 1) * 4 / 1024 ** 3


def test_row_wise_spreads_the_big_tables_on_cuda(tmp_path):
    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "8", "--device", "cuda", "--hbm-gb", "80",
                    "--sharding", "row_wise")
    assert rc == 0
    user = [t for t in rep["tables"] if t["table"] == "t_user_id"][0]
    assert user["sharding"] == "row_wise" and user["ranks"] == list(range(8))
    assert max(rep["per_rank_gb"]) < 1.5 * min(rep["per_rank_gb"])


def test_tables_beyond_hbm_go_to_uvm(tmp_path):
    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "2", "--device", "cuda", "--hbm-gb", "4")
    assert rc == 0 and "mixed_tgt.t_user_id" in rep["uvm_tables"]


@pytest.mark.parametrize("args,msg", [
    (["--preset", "tiny", "--world-size", "2", "--device", "cpu", "--sharding", "row_wise"], "needs CUDA"),
    (["--preset", "meituan", "--world-size", "2", "--device", "cuda", "--hbm-gb", "4", "--ddr-gb", "4"],
     "do not fit"),
    (["--preset", "huge", "--world-size", "2"], "huge"),
    (["--preset", "tiny", "--world-size", "0"], "--world-size must be > 0"),
])
def test_plan_mistakes_are_one_line(tmp_path, capsys, args, msg):
    rc, rep = _plan(tmp_path, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and rep is None and msg in err[-1], err
