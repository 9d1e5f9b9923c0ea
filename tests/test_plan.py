"""`cctl-rec plan`: dry-run plans of the whole CCTL model on meta tables, CPU and CUDA sharding types."""

import json

import pytest

from cctl_rec.cli import main


def _plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    rc = main(["plan", *args, "--out", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow  # plans 16 GPUs' tables: 5-9 s on one core
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


def test_planned_bytes_are_the_tables_plus_optimizer_state_within_the_planners_reservation(tmp_path):
    """Rows x dim x fp32 plus one fp32 per row (rowwise Adagrad) for every table of the three
    modules, computed here from the preset's schema, equals the report's total; TorchRec's own
    storage estimate adds only its input/output buffers (< 2%)."""
    from cctl_rec.datagen.pipeline import schemas_of
    from cctl_rec.datagen.presets import resolve

    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "8", "--device", "cuda", "--hbm-gb", "80",
                    "--sharding", "table_wise")
    assert rc == 0
    schemas = schemas_of(resolve("meituan"))
    expected = 0
    for dom, copies in (("tgt", 2), ("src", 1)):  # mixed + pure target tables, one source set
        for name, rows, _ in schemas[dom].tables(exclude=() if dom == "tgt" else _shared(schemas)):
            expected += copies * rows * (8 + 1) * 4
    assert rep["total_gb"] * 1024 ** 3 == pytest.approx(expected, rel=1e-9)
    assert rep["total_gb"] <= rep["planner_gb"] <= 1.02 * rep["total_gb"]
    assert rep["est_step_ms"] == max(rep["per_rank_est_ms"]) > 0


def _shared(schemas):
    from cctl_rec.schema import shared_attributes

    return shared_attributes(schemas["src"], schemas["tgt"])


def test_a_plan_that_cannot_fit_names_the_largest_table_and_its_memory(tmp_path, capsys):
    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "2", "--device", "cuda", "--hbm-gb", "4",
                    "--ddr-gb", "4")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and rep is None
    # a 288,871,100 x 8 user table: 288,871,100 x (8 + 1) x 4 bytes = 9.685 GB with rowwise Adagrad state
    assert "user_id (288,871,100 x 8), needs 9.69 GB with its optimizer state" in err, err


def test_a_plan_that_fits_only_before_mirroring_is_refused(tmp_path, capsys):
    """On 16 GB ranks the planner puts mixed and pure user tables (9.69 GB each) on different ranks;
    the sync needs them on the same one, which no longer fits."""
    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "8", "--device", "cuda", "--hbm-gb", "16",
                    "--sharding", "table_wise")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and rep is None and "once pure_tgt is placed like mixed_tgt" in err, err
    assert "pure_tgt.t_user_id 9.69 GB, mixed_tgt.t_user_id 9.69 GB" in err, err
    rc, rep = _plan(tmp_path, "--preset", "meituan", "--world-size", "8", "--device", "cuda", "--hbm-gb", "16",
                    "--sharding", "row_wise")
    assert rc == 0 and rep["peak_gb"] < 16


def test_compare_writes_a_table_and_a_plot_per_world_size_and_strategy(tmp_path, capsys):
    out = tmp_path / "cmp" / "c.json"
    rc = main(["plan", "--compare", "--preset", "meituan", "--device", "cuda", "--hbm-gb", "12",
               "--world-sizes", "2,8", "--shardings", "table_wise,row_wise", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world_size"], r["sharding"]) for r in rows] == [(2, "table_wise"), (2, "row_wise"),
                                                                (8, "table_wise"), (8, "row_wise")]
    by = {(r["world_size"], r["sharding"]): r for r in rows}
    assert by[(8, "row_wise")]["fits"] and by[(8, "row_wise")]["peak_gb"] < 12
    assert not by[(8, "table_wise")]["fits"] and "once pure_tgt is placed" in by[(8, "table_wise")]["reason"]
    md = (tmp_path / "cmp" / "c.md").read_text()
    assert md.count("\n| ") >= 5 and "| 8 | row_wise | yes" in md and "| 8 | table_wise | no |" in md
    assert (tmp_path / "cmp" / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,msg", [
    (["--preset", "tiny", "--world-size", "2", "--device", "cpu", "--sharding", "row_wise"], "needs CUDA"),
    (["--preset", "meituan", "--world-size", "2", "--device", "cuda", "--hbm-gb", "4", "--ddr-gb", "4"],
     "do not fit"),
    (["--preset", "huge", "--world-size", "2"], "huge"),
    (["--preset", "tiny", "--world-size", "0"], "--world-size must be > 0"),
    (["--preset", "tiny"], "--world-size is required"),
    (["--preset", "tiny", "--compare", "--world-sizes", "8,x"], "expected comma-separated integers"),
    (["--preset", "tiny", "--compare", "--shardings", "diagonal"], "'diagonal' is not a sharding type"),
])
def test_plan_mistakes_are_one_line(tmp_path, capsys, args, msg):
    rc, rep = _plan(tmp_path, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and rep is None and msg in err[-1], err
