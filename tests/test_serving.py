"""The serving artifact: weights written once, no machine paths, the raw-id maps of a prepared dataset
inside it (predict takes raw ids; unknown ids land on the reserved row), --reserved-columns, and the
AOTInductor package checked against training-time logits."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cctl_rec.cli import main
from tests.rawdata import raw_from_tiny
from tests.test_features import TINY_FEATURES, _write

SMALL = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.log_every=5",
         "scn.sync_every=10", "selector.update_every=5", "run.max_eval_rows=0"]


@pytest.fixture(scope="module")
def prepared_export(tiny_data, tmp_path_factory):
    """Raw logs -> `prepare` -> 6 training steps (DNN) -> export: (raw logs, dataset, run, export)."""
    d = tmp_path_factory.mktemp("serving")
    raw = raw_from_tiny(tiny_data, str(d / "raw"))
    data = str(d / "data")
    assert main(["prepare", "--features", _write(d, TINY_FEATURES), "--data", raw, "--out", data]) == 0
    assert main(["train", "--data", data, "--run-dir", str(d / "run"), *SMALL, "run.steps=6", "model.name=dnn",
                 "run.save_predictions=true"]) == 0
    assert main(["export", "--run-dir", str(d / "run"), "--out", str(d / "model")]) == 0
    return raw, data, d / "run", d / "model"


def _predict(capsys, model, data, out, *extra):
    rc = main(["predict", "--model", str(model), "--data", str(data), "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def test_serving_json_names_no_machine_path_and_the_weights_are_written_once(prepared_export):
    _, data, run, model = prepared_export
    text = (model / "serving.json").read_text()
    meta = json.loads(text)
    for where in (str(run), str(model), data, os.path.dirname(str(run))):
        assert where not in text
    assert meta["run"] == "run" and meta["step"] == 6 and meta["features"] == "features/features.json"
    program = torch.export.load(str(model / "program.pt2"))
    assert not program.state_dict and not program.constants
    state = torch.load(model / "model.pt", weights_only=True)
    assert meta["weights"] == list(state) and meta["program_inputs"][0] == "weights"
    import zipfile

    stored = {i.filename: i.file_size for i in zipfile.ZipFile(model / "program.pt2").infolist()}
    assert not [n for n in stored if ("/data/weights/" in n or "/data/constants/" in n) and not n.endswith(".json")]
    assert all(size < 1024 for n, size in stored.items() if "/sample_inputs/" in n), stored  # no example weights


def test_predict_takes_raw_ids_like_the_prepared_rows(prepared_export, tmp_path, capsys):
    raw, data, run, model = prepared_export
    rc, err = _predict(capsys, model, os.path.join(raw, "tgt/test"), tmp_path / "raw.parquet",
                       "--reserved-columns", "uid,city")
    assert rc == 0, err
    rc, err = _predict(capsys, model, data, tmp_path / "rows.parquet")
    assert rc == 0, err
    got, want = pq.read_table(tmp_path / "raw.parquet"), pq.read_table(tmp_path / "rows.parquet")
    np.testing.assert_allclose(got.column("logit").to_numpy(), want.column("logit").to_numpy(), rtol=0, atol=1e-6)
    train_time = pq.read_table(run / "predictions-tgt-test.parquet").column("logit").to_numpy()
    np.testing.assert_allclose(got.column("logit").to_numpy(), train_time, rtol=0, atol=1e-5)
    src = pq.read_table(os.path.join(raw, "tgt/test"))
    assert got.column("uid").to_pylist() == src.column("uid").to_pylist()  # nulls kept as they were
    assert got.column("city").to_pylist() == src.column("city").to_pylist()
    assert got.column("label").to_pylist() == src.column("label").to_pylist()


def test_unknown_raw_ids_land_on_the_reserved_row(prepared_export, tmp_path, capsys):
    raw, _, _, model = prepared_export
    t = pq.read_table(os.path.join(raw, "tgt/test")).slice(0, 3)
    row = t.slice(0, 1)
    variants = pa.concat_tables([row, row, row])
    i = variants.column_names.index("uid")
    variants = variants.set_column(i, "uid", pa.array([10 ** 12, None, 10 ** 12 + 5], pa.int64()))
    j = variants.column_names.index("city")
    variants = variants.set_column(j, "city", pa.array(["never-seen"] * 3))
    pq.write_table(variants, tmp_path / "unknown.parquet")
    rc, err = _predict(capsys, model, tmp_path / "unknown.parquet", tmp_path / "p.parquet")
    assert rc == 0, err
    z = pq.read_table(tmp_path / "p.parquet").column("logit").to_numpy()
    assert z[0] == z[1] == z[2]  # two unseen users and a null user: one reserved row


@pytest.mark.parametrize("cols, msg", [
    ("request_id", "--reserved-columns ['request_id'] not in"),
    ("logit", "would overwrite predict's own output columns"),
    ("uid,uid", "names a column twice"),
])
def test_bad_reserved_columns_are_one_line_exit_2(prepared_export, tmp_path, capsys, cols, msg):
    raw, _, _, model = prepared_export
    rc, err = _predict(capsys, model, os.path.join(raw, "tgt/test"), tmp_path / "p.parquet",
                       "--reserved-columns", cols)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p.parquet").exists()


def test_raw_input_without_the_mapped_columns_is_refused(prepared_export, tmp_path, capsys):
    _, _, _, model = prepared_export
    pq.write_table(pa.table({"user": [1, 2], "label": [0, 1]}), tmp_path / "wrong.parquet")
    rc, err = _predict(capsys, model, tmp_path / "wrong.parquet", tmp_path / "p.parquet")
    assert rc == 2 and "lacks column(s) ['uid'" in err and "feature map" in err


@pytest.mark.slow  # AOTInductor compiles C++ (45 s to 3 min on one core)
def test_aoti_package_gives_the_training_time_logits(tiny_data, tmp_path):
    from cctl_rec.export import load_artifact, serving_inputs

    run = tmp_path / "run"
    assert main(["train", "--data", tiny_data, "--run-dir", str(run), *SMALL, "run.steps=6",
                 "run.save_predictions=true"]) == 0
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "m"), "--aoti"]) == 0
    meta = json.loads((tmp_path / "m" / "serving.json").read_text())
    assert meta["aoti"] == "model.aoti.pt2" and meta["bytes"]["model.aoti.pt2"] > 0
    compiled = torch._inductor.aoti_load_package(str(tmp_path / "m" / "model.aoti.pt2"))
    model, meta = load_artifact(str(tmp_path / "m"))
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    weights = tuple(state[k] for k in meta["weights"])
    table = pq.read_table(os.path.join(tiny_data, "tgt/test"))
    inputs = serving_inputs(model, table, meta["max_seq_len"], "tgt/test")
    want = torch.tensor(pq.read_table(run / "predictions-tgt-test.parquet").column("logit").to_numpy())
    torch.testing.assert_close(compiled(weights, *inputs), want, rtol=0, atol=1e-5)
