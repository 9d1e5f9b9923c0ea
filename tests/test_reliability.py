"""Issue #8: bad input, faults and security, one test per case (docs/reliability.md is made from them).

Every bad-input test drives the CLI (``cctl_rec.cli.main``) and checks three things: the exit code
(2 for a user mistake, 1 for a full disk), exactly one error line on stderr naming the bad value
and what was expected (no traceback), and that nothing was written (no run directory, output
file or export) or that the previous state is byte-identical.
"""

from __future__ import annotations

import ast
import errno
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cctl_rec.cli import main
from cctl_rec.data.manifest import MANIFEST, sha256_file, verify_shard
from tests.tinydata import N_ITEMS, N_USERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.max_eval_rows=512",
        "run.log_every=2"]
rel = pytest.mark.reliability


# ----------------------------------------------------------------------------- helpers


def refused(capsys, argv: list[str], *needles: str, rc: int = 2) -> str:
    """Runs ``cctl-rec argv``; asserts exit ``rc``, one error line holding every needle, no traceback."""
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"cctl-rec {argv[0]}: error: ")]
    assert len(lines) == 1, err
    assert got == rc, (got, lines[0])
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def tree(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden ones included)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = sha256_file(p)
    return out


def dataset(tiny_data: str, dst, split: str = "tgt/train", shard: int = 0, table=None, raw=None,
            manifest=None, rehash: bool = True) -> str:
    """A copy of the tiny dataset with one shard changed: ``table`` maps its Arrow table, ``raw``
    its bytes, ``manifest`` the manifest dict. With ``rehash`` the manifest records every shard's
    real size and sha256 (so the checksum check passes and the case's own check is what fails)."""
    dst = str(dst)
    shutil.copytree(tiny_data, dst)
    path = os.path.join(dst, split, f"part-{shard:05d}.parquet")
    if table is not None:
        pq.write_table(table(pq.read_table(path)), path, row_group_size=1000)
    if raw is not None:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(raw(data))
    with open(os.path.join(dst, MANIFEST)) as f:
        m = json.load(f)
    if rehash:
        for entries in m["splits"].values():
            for e in entries:
                p = os.path.join(dst, e["path"])
                e["sha256"], e["bytes"] = sha256_file(p), os.path.getsize(p)
    if manifest is not None:
        manifest(m)
    with open(os.path.join(dst, MANIFEST), "w") as f:
        json.dump(m, f)
    return dst


def col(t: pa.Table, name: str, values) -> pa.Table:
    """``t`` with column ``name`` replaced by ``values`` (an Arrow array)."""
    return t.set_column(t.schema.get_field_index(name), name, values)


def train_argv(data, run, *extra) -> list[str]:
    return ["train", "--data", str(data), "--run-dir", str(run), *BASE, *extra]


def _zstd(t: pa.Table, path: str) -> None:
    pq.write_table(t, path, row_group_size=1000, compression="zstd")


# ----------------------------------------------------------------------------- data


@rel("data", "missing file or directory", expect="train --data DIR that does not exist: exit 2, one line naming "
     "DIR; no run directory")
def test_missing_dataset_directory(tmp_path, capsys):
    run = tmp_path / "run"
    refused(capsys, train_argv(tmp_path / "nope", run), f"dataset directory '{tmp_path / 'nope'}' does not exist",
            "cctl-rec datagen --out")
    assert not run.exists()


@rel("data", "missing file or directory", expect="a shard listed in manifest.json is gone: exit 2, one line "
     "naming the file; no run directory")
def test_missing_shard_file(tiny_data, tmp_path, capsys):
    d = dataset(tiny_data, tmp_path / "d")
    os.remove(os.path.join(d, "tgt/train/part-00001.parquet"))
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00001.parquet", "is listed in",
            "but does not exist")
    assert not (tmp_path / "run").exists()


@rel("data", "missing file or directory", expect="predict --data PATH that does not exist: exit 2, one line "
     "naming PATH; no output file")
def test_predict_missing_data(exported, tmp_path, capsys):
    out = tmp_path / "p.parquet"
    refused(capsys, ["predict", "--model", exported, "--data", tmp_path / "nope.parquet", "--out", out],
            f"--data {tmp_path / 'nope.parquet'} does not exist")
    assert not out.exists()


@rel("data", "empty file", expect="a 0-byte shard: exit 2, one line naming the file and 'expected a complete "
     "Parquet file'; no run directory")
def test_zero_byte_shard(tiny_data, tmp_path, capsys):
    d = dataset(tiny_data, tmp_path / "d", raw=lambda b: b"")
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00000.parquet is not a readable Parquet file",
            "expected a complete Parquet file")
    assert not (tmp_path / "run").exists()


@rel("data", "empty file", expect="a split whose Parquet files hold 0 rows: exit 2, one line naming the split's "
     "directory, 0 rows and the rank count; no run directory")
def test_zero_row_split(tiny_data, tmp_path, capsys):
    d = dataset(tiny_data, tmp_path / "d")
    for i in range(2):
        p = os.path.join(d, f"tgt/test/part-{i:05d}.parquet")
        pq.write_table(pq.read_table(p).slice(0, 0), p)
    dataset(d, tmp_path / "d2")  # rehash
    refused(capsys, train_argv(tmp_path / "d2", tmp_path / "run"), "tgt/test hold 0 rows: too few for 1 rank(s)")
    assert not (tmp_path / "run").exists()


@rel("data", "truncated or corrupt Parquet", expect="a shard cut in half: exit 2, one line naming the file and "
     "'expected a complete Parquet file'; no run directory")
def test_truncated_shard(tiny_data, tmp_path, capsys):
    d = dataset(tiny_data, tmp_path / "d", split="src/train", shard=1, raw=lambda b: b[: len(b) // 2])
    refused(capsys, train_argv(d, tmp_path / "run"), "src/train/part-00001.parquet is not a readable Parquet file",
            "truncated")
    assert not (tmp_path / "run").exists()


@rel("data", "truncated or corrupt Parquet", expect="a shard with corrupt page bytes and an intact footer "
     "(data.verify=none): exit 2 at the first read, one line naming the file and row group; the run directory "
     "this command made is removed")
def test_corrupt_row_group(tiny_data, tmp_path, capsys):
    d = dataset(tiny_data, tmp_path / "d")
    path = os.path.join(d, "tgt/train/part-00000.parquet")
    _zstd(pq.read_table(path), path)
    good = open(path, "rb").read()
    for frac in np.linspace(0.05, 0.5, 46):  # find bytes whose corruption the decompressor notices
        bad = bytearray(good)
        at = int(len(good) * frac)
        bad[at:at + 64] = b"\xff" * 64
        with open(path, "wb") as f:
            f.write(bad)
        try:
            pf = pq.ParquetFile(path)
            pf.read_row_group(0)
        except OSError:
            break
    else:
        pytest.fail("no corruption of the first row group was detected by the reader")
    refused(capsys, train_argv(d, tmp_path / "run", "data.verify=none", "run.steps=2"),
            "tgt/train/part-00000.parquet: row group 0 cannot be read", "corrupt or truncated")
    assert not (tmp_path / "run").exists()


@rel("data", "missing column", expect="a target shard without 'device': exit 2, one line naming the file, the "
     "column and the schema; no run directory")
def test_missing_column(tiny_data, tmp_path, capsys):
    d = dataset(tiny_data, tmp_path / "d", table=lambda t: t.drop_columns(["device"]))
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00000.parquet lacks column(s) ['device'] "
            "of the tgt schema")
    assert not (tmp_path / "run").exists()


@rel("data", "unknown extra column", expect="decided: warn. Every shard with an extra 'raw_query' column: one "
     "warning naming it, training runs (exit 0)")
def test_extra_column_warns(tiny_data, tmp_path, capsys):
    def add(t):
        return t.append_column("raw_query", pa.array(["q"] * t.num_rows))

    d = dataset(tiny_data, tmp_path / "d", table=add)
    d = dataset(d, tmp_path / "d2", shard=1, table=add)
    assert main(train_argv(d, tmp_path / "run", "run.steps=2")) == 0
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if "WARNING" in ln and "ignoring extra column(s) ['raw_query']" in ln]
    assert warn and "tgt/train/part-00000.parquet" in warn[0], err
    assert (tmp_path / "run" / "metrics.json").exists()


@rel("data", "wrong dtype")
@pytest.mark.parametrize("name,values,msg", [
    ("hour", pa.array(np.zeros(2048, np.float32)), "column 'hour' has type float, expected integer"),
    ("seq", pa.array([["a"]] * 2048), "column 'seq' has type list<element: string>, expected list<int>"),
    ("user_in_other", pa.array(np.ones(2048, np.int8)), "column 'user_in_other' has type int8, expected bool"),
    ("label", pa.array(["1"] * 2048), "column 'label' has type string, expected integer"),
], ids=["float-id", "list-of-strings", "int-flag", "string-label"])
def test_wrong_dtype(tiny_data, tmp_path, capsys, name, values, msg):
    """A column of the wrong Arrow type: exit 2, one line naming the file, column, its type and the
    expected type; no run directory."""
    d = dataset(tiny_data, tmp_path / "d", table=lambda t: col(t, name, values))
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00000.parquet", msg)
    assert not (tmp_path / "run").exists()


@rel("data", "null ids")
@pytest.mark.parametrize("split,name,values,msg", [
    ("tgt/train", "gender", pa.array([None] * 2048, pa.int64()),
     "column 'gender' has 1000 null value(s) (row group 0); expected ids"),
    ("src/train", "item_id", pa.array([1] * 1500 + [None] * 6692, pa.int64()),
     "column 'item_id' has 500 null value(s) (row group 1); expected ids"),
    ("tgt/valid", "label", pa.array([None] * 512, pa.int8()),
     "column 'label' has 512 null value(s) (row group 0); expected labels"),
], ids=["tgt-gender", "src-item_id-row-group-1", "valid-label"])
def test_null_ids(tiny_data, tmp_path, capsys, split, name, values, msg):
    """Null ids or labels, found from the Parquet footer before training: exit 2, one line naming
    the file, column, count and row group; no run directory."""
    d = dataset(tiny_data, tmp_path / "d", split=split, table=lambda t: col(t, name, values))
    refused(capsys, train_argv(d, tmp_path / "run"), f"{split}/part-00000.parquet", msg)
    assert not (tmp_path / "run").exists()


@rel("data", "null ids", expect="a null id inside a sequence list, found when the batch is read: one line naming "
     "the file, the column and the count")
def test_null_id_inside_a_sequence(tiny_data, tmp_path):
    from cctl_rec.config import DataConfig
    from cctl_rec.data.loader import build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.schema import synthetic_schemas
    from tests.tinydata import N_BRAND, N_CAT

    schemas = synthetic_schemas(N_USERS, N_ITEMS, N_CAT, N_BRAND, n_cities=30)
    path = os.path.join(tiny_data, "tgt/train/part-00000.parquet")
    t = pq.read_table(path).slice(0, 8)
    t = col(t, "seq", pa.array([[1, None, 3]] * 8, pa.list_(pa.int64())))
    bad = str(tmp_path / "nullseq.parquet")
    pq.write_table(t, bad)
    with pytest.raises(ValueError) as e:
        build_batch(next(iter(ParquetStream([bad], schemas["tgt"], 8))), None, schemas, DataConfig())
    assert str(e.value) == f"data file {bad}: column 'seq' holds 8 null id(s) inside its lists; expected ids"


@rel("data", "negative ids", expect="a negative user_id: exit 2, one line naming the file, column, the id and "
     "'expected ids in [0, 300)'; no run directory")
def test_negative_ids(tiny_data, tmp_path, capsys):
    def neg(t):
        v = t.column("user_id").to_numpy().copy()
        v[1500] = -3
        return col(t, "user_id", pa.array(v))

    d = dataset(tiny_data, tmp_path / "d", table=neg)
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00000.parquet: column 'user_id' has "
            f"negative id -3; expected ids in [0, {N_USERS})")
    assert not (tmp_path / "run").exists()


@rel("data", "ids >= table size")
@pytest.mark.parametrize("split,name,values,msg", [
    ("tgt/train", "item_id", lambda t: pa.array(np.full(t.num_rows, 10 ** 9)),
     f"column 'item_id' has id 1000000000 >= table size {N_ITEMS}; expected ids in [0, {N_ITEMS})"),
    ("src/train", "seq", lambda t: pa.array([[1, 5000]] * t.num_rows, pa.list_(pa.int64())),
     f"column 'seq' has id 5000 >= table size {N_ITEMS}; expected ids in [0, {N_ITEMS})"),
], ids=["tgt-item_id", "src-seq"])
def test_ids_beyond_the_table(tiny_data, tmp_path, capsys, split, name, values, msg):
    """Decided: fail (ids are mapped into the table when the data is written, so serving sees the
    same ids). Exit 2, one line naming the file, column, id and table size; no run directory."""
    d = dataset(tiny_data, tmp_path / "d", split=split, table=lambda t: col(t, name, values(t)))
    refused(capsys, train_argv(d, tmp_path / "run"), f"{split}/part-00000.parquet", msg)
    assert not (tmp_path / "run").exists()


@rel("data", "labels outside {0, 1}")
@pytest.mark.parametrize("bad", [2, -1])
def test_labels_outside_0_1(tiny_data, tmp_path, capsys, bad):
    """A label 2 or -1: exit 2, one line naming the file, the value and 'expected 0 or 1'; no run
    directory."""
    def lab(t):
        v = t.column("label").to_numpy().copy()
        v[7] = bad
        return col(t, "label", pa.array(v))

    d = dataset(tiny_data, tmp_path / "d", split="src/train", table=lab)
    refused(capsys, train_argv(d, tmp_path / "run"), "src/train/part-00000.parquet: column 'label' has value "
            f"{bad}; expected 0 or 1")
    assert not (tmp_path / "run").exists()


@rel("data", "NaN/inf dense values")
@pytest.mark.parametrize("name,value,msg", [
    ("label", float("nan"), "column 'label' has type double, expected integer"),
    ("user_id", float("inf"), "column 'user_id' has type double, expected integer"),
], ids=["nan-label", "inf-id"])
def test_nan_inf_values(tiny_data, tmp_path, capsys, name, value, msg):
    """Every model input is an id (no dense features), so a float column holding NaN or inf where an
    id or label belongs is refused by type: exit 2, one line naming file, column and types; no run
    directory."""
    def f(t):
        v = t.column(name).to_numpy().astype(np.float64)
        v[3] = value
        return col(t, name, pa.array(v))

    d = dataset(tiny_data, tmp_path / "d", table=f)
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00000.parquet", msg)
    assert not (tmp_path / "run").exists()


@rel("data", "sequences longer than the configured maximum", expect="data.long_seq=fail with data.max_seq_len=5 "
     "(the tiny data has sequences of up to 25): exit 2 before training, one line naming the file, the length "
     "and the maximum; no run directory")
def test_long_sequences_fail_when_asked(tiny_data, tmp_path, capsys):
    refused(capsys, train_argv(tiny_data, tmp_path / "run", "data.long_seq=fail", "data.max_seq_len=5"),
            "tgt/train/part-00000.parquet: column 'seq' has a sequence of length 25, longer than data.max_seq_len=5")
    assert not (tmp_path / "run").exists()


@rel("data", "a source file given as target", expect="the manifest's target train split points at a source "
     "shard: exit 2, one line naming the file, the missing target column and 'is it a source file?'")
def test_source_file_as_target(tiny_data, tmp_path, capsys):
    def swap(m):
        m["splits"]["tgt/train"][0] = dict(m["splits"]["src/train"][0])

    d = dataset(tiny_data, tmp_path / "d", manifest=swap)
    refused(capsys, train_argv(d, tmp_path / "run"), "src/train/part-00000.parquet lacks column(s) ['position'] "
            "of the tgt schema", "is it a source file?")
    assert not (tmp_path / "run").exists()


@rel("data", "shards whose schemas differ")
@pytest.mark.parametrize("change,msg", [
    (lambda t: col(t, "user_id", t.column("user_id").cast(pa.int32())), "column 'user_id' is int32 here but int64"),
    (lambda t: t.append_column("extra", pa.array(np.zeros(t.num_rows))), "column 'extra' is double here but absent"),
], ids=["int32-vs-int64", "extra-column-in-one-shard"])
def test_shards_with_different_schemas(tiny_data, tmp_path, capsys, change, msg):
    """The second shard of a split differs from the first (type or columns): exit 2, one line naming
    both files and the column; no run directory."""
    d = dataset(tiny_data, tmp_path / "d", shard=1, table=change)
    line = refused(capsys, train_argv(d, tmp_path / "run"), "tgt/train/part-00001.parquet", msg,
                   "expected every shard of a split to have the same columns and types")
    assert "tgt/train/part-00000.parquet" in line
    assert not (tmp_path / "run").exists()


@rel("data", "a manifest checksum mismatch")
@pytest.mark.parametrize("how,msg", [
    ("flip", "has sha256"), ("append", "bytes, the manifest recorded"),
], ids=["same-size-other-bytes", "grown"])
def test_manifest_checksum_mismatch(tiny_data, tmp_path, capsys, how, msg):
    """A shard changed after its manifest was written (same size, other bytes; or grown): exit 2,
    one line naming the file, what it has and what the manifest recorded; no run directory."""
    d = dataset(tiny_data, tmp_path / "d")
    d = dataset(d, tmp_path / "d2", split="tgt/valid", shard=1, rehash=False,
                raw=(lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:]) if how == "flip" else (lambda b: b + b"x"))
    refused(capsys, train_argv(d, tmp_path / "run"), "tgt/valid/part-00001.parquet", msg, "the manifest recorded",
            "changed after the manifest was written")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- config


@rel("config", "unknown key")
@pytest.mark.parametrize("how", ["override", "yaml"])
def test_unknown_config_key(tiny_data, tmp_path, capsys, how):
    """A misspelled key (selector.gama), on the command line or nested in the YAML: exit 2, one line
    with its dotted path and the valid keys; no run directory."""
    extra, argv = [], []
    if how == "override":
        extra = ["selector.gama=0.5"]
    else:
        (tmp_path / "c.yaml").write_text("selector:\n  gama: 0.5\n")
        argv = ["--config", str(tmp_path / "c.yaml")]
    refused(capsys, train_argv(tiny_data, tmp_path / "run", *extra) + argv,
            "unknown config key 'selector.gama'; valid: alpha, causal_credit")
    assert not (tmp_path / "run").exists()


@rel("config", "wrong type")
@pytest.mark.parametrize("override,msg", [
    ("data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
    ("model.tower=64", "model.tower must be a list, got 64"),
    ("ren.enabled=maybe", "ren.enabled must be true or false, got 'maybe'"),
    ("selector.alpha=[1]", "selector.alpha must be a number, got [1]"),
    ("selector.mode=magic", "selector.mode must be one of ['paper'"),
], ids=["str-for-int", "int-for-list", "str-for-bool", "list-for-float", "not-a-choice"])
def test_wrong_config_type(tiny_data, tmp_path, capsys, override, msg):
    """A value of the wrong type: exit 2, one line naming the key, the value and the type expected;
    no run directory."""
    refused(capsys, train_argv(tiny_data, tmp_path / "run", override), msg)
    assert not (tmp_path / "run").exists()


OUT_OF_RANGE = [
    ("scn.sync_every=0", "scn.sync_every must be > 0, got 0"),                        # k <= 0
    ("scn.sync_every=-5", "scn.sync_every must be > 0, got -5"),
    ("selector.gamma=1.5", "selector.gamma must be in [0, 1], got 1.5"),
    ("selector.gamma=-0.1", "selector.gamma must be in [0, 1], got -0.1"),
    ("selector.alpha=-1", "selector.alpha must be >= 0, got -1"),
    ("data.batch_size=0", "data.batch_size must be > 0, got 0"),
    ("data.batch_size=-8", "data.batch_size must be > 0, got -8"),
    ("model.tower=[]", "model.tower must list at least one hidden width, got []"),
    ("model.tower=[32,0]", "model.tower widths must be > 0, got [32, 0]"),
    ("selector.update_every=-1", "selector.update_every must be >= 0 (0: from the run's length), got -1"),
    ("selector.alpha=.nan", "selector.alpha must be a finite number, got nan"),
    ("data.src_ratio=.inf", "data.src_ratio must be a finite number, got inf"),
    ("data.src_ratio=0", "model.name=cctl needs source rows (data.src_ratio > 0, got 0)"),
]


@rel("config", "out-of-range values")
@pytest.mark.parametrize("override,msg", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_config(tiny_data, tmp_path, capsys, override, msg):
    """An out-of-range value (k <= 0, gamma outside [0, 1], alpha < 0, batch <= 0, an empty layer
    list, NaN/inf): exit 2, one line naming the key, the value and the range; no run directory."""
    refused(capsys, train_argv(tiny_data, tmp_path / "run", override), msg)
    assert not (tmp_path / "run").exists()


@rel("config", "row_wise sharding on CPU", expect="dist.sharding=row_wise (and table_row_wise, optim adam) on a "
     "CPU machine: exit 2 before anything is written, one line naming the value and the CPU choices")
@pytest.mark.skipif(torch.cuda.is_available(), reason="row_wise is valid with CUDA")
@pytest.mark.parametrize("override,msg", [
    ("dist.sharding=row_wise", "dist.sharding=row_wise needs CUDA"),
    ("dist.sharding=table_row_wise", "dist.sharding=table_row_wise needs CUDA"),
    ("optim.sparse_optimizer=adam", "optim.sparse_optimizer=adam is not supported by fbgemm's CPU TBE"),
], ids=["row_wise", "table_row_wise", "adam"])
def test_cuda_only_choices_on_cpu(tiny_data, tmp_path, capsys, override, msg):
    line = refused(capsys, train_argv(tiny_data, tmp_path / "run", override), msg)
    assert "data_parallel" in line or "exact_rowwise_adagrad" in line
    assert not (tmp_path / "run").exists()


@rel("config", "a world size the data cannot be split over")
@pytest.mark.parametrize("world,msg", [
    (64, "give 64 rows per rank over 64 rank(s), fewer than one batch of 128"),
    (5000, "hold 4096 rows: too few for 5000 rank(s)"),
], ids=["64-ranks", "5000-ranks"])
def test_world_size_the_data_cannot_split_over(tiny_data, tmp_path, capsys, monkeypatch, world, msg):
    """WORLD_SIZE (as torchrun sets it) larger than the target train split allows: exit 2 before any
    process group or file, one line naming the split, the rows and the rank count."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    refused(capsys, train_argv(tiny_data, tmp_path / "run"), "tgt/train", msg)
    assert not (tmp_path / "run").exists()


@rel("config", "tables too large for the plan", expect="a dataset whose user_id table has 10^10 rows on CPU: exit "
     "2, one line naming the largest table, its rows and the planner's reason; the run directory it made is "
     "removed")
def test_tables_too_large_for_the_plan(tiny_data, tmp_path, capsys):
    def huge(m):
        for d in ("src", "tgt"):
            for f in m["schema"][d]["features"]:
                if f["name"] == "user_id":
                    f["cardinality"] = 10 ** 10

    d = dataset(tiny_data, tmp_path / "d", manifest=huge)
    refused(capsys, train_argv(d, tmp_path / "run"), "the embedding tables do not fit 1 rank(s)",
            "t_user_id, has 10,000,000,000 rows x 8", "insufficient storage", "cctl-rec plan --data")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> str:
    """A finished 4-step CCTL run with its checkpoint."""
    run = str(tmp_path_factory.mktemp("trained") / "run")
    assert main(train_argv(tiny_data, run, "run.steps=4")) == 0
    return run


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("exported") / "model")
    assert main(["export", "--run-dir", trained, "--out", out]) == 0
    return out


@rel("artifacts", "a checkpoint from a different model or config")
@pytest.mark.parametrize("override,key", [("model.tower=[64,16]", "model"), ("model.name=dnn", "model"),
                                          ("selector.gamma=0.5", "selector"), ("data.batch_size=64", "data")],
                         ids=["tower", "dnn", "gamma", "batch"])
def test_resume_from_another_config_is_refused(trained, tiny_data, tmp_path, capsys, override, key):
    """Rerunning a run directory with another model or config: exit 2, one line naming the
    checkpoint and the first fingerprint key that differs; the run directory (config.yaml,
    checkpoints, metrics) is byte-identical."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = tree(run)
    refused(capsys, train_argv(tiny_data, run, "run.steps=8", override), "step-00000004 was made by a different "
            f"model or config: {key} is")
    assert tree(run) == before


@rel("artifacts", "a checkpoint from a different model or config", expect="export of a run whose config.yaml no "
     "longer matches its checkpoint: exit 2, one line naming the differing key; no export directory")
def test_export_with_an_edited_config_is_refused(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = (run / "config.yaml").read_text().replace("- 32\n  - 16\n", "- 64\n  - 16\n")
    assert "- 64" in cfg
    (run / "config.yaml").write_text(cfg)
    refused(capsys, ["export", "--run-dir", run, "--out", tmp_path / "m"], "was made by a different model or "
            "config: model is")
    assert not (tmp_path / "m").exists()


@rel("artifacts", "an export directory with missing files")
@pytest.mark.parametrize("remove", ["model.pt", "serving.json"])
def test_export_dir_with_missing_files(exported, tiny_data, tmp_path, capsys, remove):
    """predict with an export directory lacking model.pt or serving.json: exit 2, one line naming the
    directory and the missing file; no output file."""
    m = tmp_path / "m"
    shutil.copytree(exported, m)
    os.remove(m / remove)
    out = tmp_path / "p.parquet"
    refused(capsys, ["predict", "--model", m, "--data", tiny_data, "--out", out], f"lacks ['{remove}']",
            "is it a `cctl-rec export` output?")
    assert not out.exists()


@rel("artifacts", "an export directory with missing files", expect="predict with a model.pt of another shape than "
     "serving.json describes: exit 2, one line naming model.pt; no output file")
def test_export_dir_with_a_foreign_model_pt(exported, tiny_data, tmp_path, capsys):
    m = tmp_path / "m"
    shutil.copytree(exported, m)
    state = torch.load(m / "model.pt", weights_only=True)
    state["tables.user_id"] = torch.zeros(7, 8)
    torch.save(state, m / "model.pt")
    out = tmp_path / "p.parquet"
    refused(capsys, ["predict", "--model", m, "--data", tiny_data, "--out", out], "model.pt does not match",
            "serving.json")
    assert not out.exists()


@rel("artifacts", "predict on data with the wrong schema")
@pytest.mark.parametrize("what,msg", [
    ("source split", "lacks column(s) ['position'] of the tgt schema"),
    ("ids beyond the served tables", f"column 'item_id' has id 999999 >= table size {N_ITEMS}"),
    ("float ids", "column 'hour' has type double, expected integer"),
], ids=["source-split", "ids-beyond-tables", "float-ids"])
def test_predict_on_the_wrong_schema(exported, tiny_data, tmp_path, capsys, what, msg):
    """predict on source rows, on ids beyond the exported tables, or on a mistyped column: exit 2,
    one line naming the file, the column and what was expected; no output file."""
    out = tmp_path / "p.parquet"
    argv = ["predict", "--model", exported, "--out", out]
    if what == "source split":
        argv += ["--data", tiny_data, "--split", "src/train"]
    else:
        t = pq.read_table(os.path.join(tiny_data, "tgt/test/part-00000.parquet"))
        t = col(t, "item_id", pa.array(np.full(t.num_rows, 999999))) if what.startswith("ids") else \
            col(t, "hour", pa.array(t.column("hour").to_numpy().astype(np.float64)))
        pq.write_table(t, tmp_path / "in.parquet")
        argv += ["--data", tmp_path / "in.parquet"]
    refused(capsys, argv, msg)
    assert not out.exists()


# ----------------------------------------------------------------------------- faults

KILL_CHECKPOINT = """
import os, signal, sys
import torch.distributed.checkpoint.filesystem as fs
from cctl_rec.train import checkpoint as ck

real_save, real_write = ck.dcp.save, fs._write_item
kill_at = sys.argv[1]
calls = []

def write_item(*args, **kwargs):
    out = real_write(*args, **kwargs)
    calls.append(1)
    if len(calls) == 20:  # part of the tensors are on disk: die with no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    return out

def save(state, checkpoint_id, **kw):  # kw: storage_writer (None on a local path)
    if os.path.basename(checkpoint_id).startswith(kill_at):  # .step-N.tmp-<pid>
        fs._write_item = write_item
    return real_save(state, checkpoint_id=checkpoint_id, **kw)

ck.dcp.save = save
from cctl_rec.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _metrics(run) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: m[k] for k in ("target_test", "target_valid", "selector", "reward_mean", "steps", "syncs")}


def _python(script: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # kills a training subprocess
@rel("fault", "a kill during a checkpoint write", expect="SIGKILL halfway through writing step 6's checkpoint: "
     "step 3's checkpoint is byte-identical, no step 6 appears, the rerun resumes from step 3 (temp directory "
     "removed) and ends where an uninterrupted run ends")
def test_kill_during_checkpoint_write(tiny_data, tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(train_argv(tiny_data, full, "run.steps=6")) == 0
    assert main(train_argv(tiny_data, run, "run.steps=3")) == 0
    ckpts = run / "checkpoints"
    before = tree(ckpts / "step-00000003")
    r = _python(KILL_CHECKPOINT, ".step-00000006.tmp-", *train_argv(tiny_data, run, "run.steps=6"))
    assert r.returncode == -9, r.stderr[-2000:]
    tmp, kept = sorted(os.listdir(ckpts))
    assert tmp.startswith(".step-00000006.tmp-") and kept == "step-00000003"
    assert os.listdir(ckpts / tmp)  # the kill came in the middle of the write
    assert tree(ckpts / "step-00000003") == before
    assert main(train_argv(tiny_data, run, "run.steps=6")) == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 3
    assert sorted(os.listdir(ckpts)) == ["step-00000003", "step-00000006"]
    assert _metrics(run) == _metrics(full)


KILL_DATAGEN = """
import os, signal, sys
from cctl_rec.datagen import writer

real = writer.replace
calls = []

def replace(src, dst):
    calls.append(dst)
    if len(calls) == 3 and dst.endswith(".parquet"):  # a shard half on disk under its temp name
        with open(src, "r+b") as f:
            f.truncate(os.path.getsize(src) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

writer.replace = replace
from cctl_rec.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # kills a datagen subprocess
@rel("fault", "a kill during datagen", expect="SIGKILL while a shard is half written: no manifest (train refuses "
     "the directory in one line), the rerun completes, every shard verifies against its sha256, no temp file is "
     "left and the bytes equal an uninterrupted run's")
def test_kill_during_datagen(tmp_path, capsys):
    out, clean = tmp_path / "d", tmp_path / "clean"
    args = ["datagen", "--preset", "tiny", "--scale", "0.1", "--out"]
    r = _python(KILL_DATAGEN, *args, out)
    assert r.returncode == -9, r.stderr[-2000:]
    assert not (out / MANIFEST).exists()
    temps = [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
    assert temps, "the kill should leave a half-written temp file"
    refused(capsys, train_argv(out, tmp_path / "run"), "manifest.json not found", "is not a finished dataset")
    assert main([*args, str(out)]) == 0
    assert main([*args, str(clean)]) == 0
    capsys.readouterr()
    m = json.loads((out / MANIFEST).read_text())
    entries = [e for v in m["splits"].values() for e in v]
    assert entries and all(verify_shard(str(out), e) for e in entries)
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
    assert m["splits"] == json.loads((clean / MANIFEST).read_text())["splits"]


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@rel("fault", "a full disk simulated", expect="ENOSPC while writing a checkpoint: exit 1, one line naming the "
     "checkpoint; the temp directory is gone, the previous checkpoint and metrics.json are byte-identical, a rerun "
     "resumes from it")
def test_full_disk_during_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    run = tmp_path / "run"
    assert main(train_argv(tiny_data, run, "run.steps=3")) == 0
    ckpts, metrics = tree(run / "checkpoints"), (run / "metrics.json").read_bytes()
    real, calls = fs._write_item, []

    def write_item(*args, **kwargs):
        calls.append(1)
        return _enospc() if len(calls) > 10 else real(*args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", write_item)
    capsys.readouterr()
    refused(capsys, train_argv(tiny_data, run, "run.steps=6"), "No space left on device while writing checkpoint",
            "step-00000006", "the previous checkpoints are intact", rc=1)
    assert tree(run / "checkpoints") == ckpts and (run / "metrics.json").read_bytes() == metrics
    monkeypatch.setattr(fs, "_write_item", real)
    assert main(train_argv(tiny_data, run, "run.steps=6")) == 0
    assert json.loads((run / "metrics.json").read_text())["resumed_from_step"] == 3


@rel("fault", "a full disk simulated", expect="ENOSPC halfway through a datagen shard: exit 1, one line naming the "
     "output directory; no partial shard or temp file, the earlier complete dataset (manifest and shards) is "
     "byte-identical")
def test_full_disk_during_datagen(tmp_path, capsys, monkeypatch):
    from cctl_rec.datagen import writer

    out = tmp_path / "d"
    assert main(["datagen", "--preset", "tiny", "--scale", "0.3", "--max-shards", "1", "--out", str(out)]) == 0
    before = tree(out)

    def half_then_full(table, sink, *args, **kwargs):
        sink.write(b"PAR1 half a shard")
        _enospc()

    monkeypatch.setattr(writer, "write_table", half_then_full)
    capsys.readouterr()
    refused(capsys, ["datagen", "--preset", "tiny", "--scale", "0.3", "--out", out], "No space left on device",
            f"while writing the dataset into {out}", "a rerun resumes", rc=1)
    assert tree(out) == before
    assert all(verify_shard(str(out), e) for v in json.loads((out / MANIFEST).read_text())["splits"].values()
               for e in v)


@rel("fault", "a full disk simulated", expect="ENOSPC while export writes serving.json over an earlier export: "
     "exit 1, one line naming the export; the earlier export is byte-identical, no temp directory is left")
def test_full_disk_during_export(trained, tmp_path, capsys, monkeypatch):
    import cctl_rec.export as export

    out = tmp_path / "m"
    assert main(["export", "--run-dir", trained, "--out", str(out)]) == 0
    before = tree(out)
    real = export.atomic_write_bytes

    def full(path, data):
        return _enospc() if path.endswith("serving.json") else real(path, data)

    monkeypatch.setattr(export, "atomic_write_bytes", full)
    capsys.readouterr()
    refused(capsys, ["export", "--run-dir", trained, "--out", out], "No space left on device while writing the "
            f"export {out}", "is as it was", rc=1)
    assert tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ----------------------------------------------------------------------------- security


def _sources() -> list[str]:
    files = []
    for d in ("cctl_rec", "datagen", "launch", "scripts"):
        files += glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True)
    assert len(files) > 30
    return files


def _calls(names: set[str]) -> list[tuple[str, int, ast.Call]]:
    """(file, line, call) of every call whose dotted name ends with one of ``names``."""
    out = []
    for path in _sources():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                base = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
                if name in names or f"{base}.{name}" in names:
                    out.append((os.path.relpath(path, REPO), node.lineno, node))
    return out


@rel("security", "YAML through safe_load", expect="a config file or override with a !!python/object tag: exit 2, "
     "one line naming the file or override; the tagged call never runs; no run directory")
def test_yaml_python_tags_are_refused(tiny_data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"run: !!python/object/apply:os.mkdir ['{marker}']\n")
    refused(capsys, train_argv(tiny_data, tmp_path / "run") + ["--config", str(evil)],
            f"config file {evil} is not valid YAML", "python/object/apply:os.mkdir")
    refused(capsys, train_argv(tiny_data, tmp_path / "run", f'run.seed=!!python/object/apply:os.mkdir ["{marker}"]'),
            "override 'run.seed=!!python/object/apply:os.mkdir", "expected a number, string, boolean or list")
    assert not marker.exists() and not (tmp_path / "run").exists()


@rel("security", "YAML through safe_load", expect="source scan: no yaml.load / full_load / unsafe_load or "
     "Loader= anywhere in cctl_rec, datagen, launch, scripts")
def test_no_unsafe_yaml_loads():
    bad = [(f, ln) for f, ln, _ in _calls({"yaml.load", "yaml.load_all", "yaml.full_load", "yaml.unsafe_load",
                                            "yaml.full_load_all", "yaml.unsafe_load_all"})]
    assert bad == []
    safe = [(f, ln) for f, ln, _ in _calls({"yaml.safe_load"})]
    assert ("cctl_rec/config.py" in {f for f, _ in safe})


class _Payload:
    """Unpickling this runs ``os.mkdir(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@rel("security", "no unpickling of user files", expect="an export whose model.pt pickles a call to os.mkdir: "
     "predict exits 2 with one line naming model.pt (weights_only load); the call never runs; no output file")
def test_pickle_payload_as_model_pt_is_refused(exported, tiny_data, tmp_path, capsys):
    marker, m, out = tmp_path / "pwned", tmp_path / "m", tmp_path / "p.parquet"
    shutil.copytree(exported, m)
    torch.save({"tables.user_id": _Payload(str(marker))}, m / "model.pt")
    refused(capsys, ["predict", "--model", m, "--data", tiny_data, "--out", out], "model.pt is not a weights-only "
            "state dict", "refusing to unpickle")
    assert not marker.exists() and not out.exists()


@rel("security", "no unpickling of user files", expect="a checkpoint whose DCP .metadata pickles a call to "
     "os.mkdir: train (resume) and export exit 2 with one line naming the class; the call never runs; the run "
     "directory is byte-identical")
def test_pickle_payload_as_checkpoint_metadata_is_refused(trained, tiny_data, tmp_path, capsys):
    marker, run = tmp_path / "pwned", tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "checkpoints" / "step-00000004" / ".metadata", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    before = tree(run)
    refused(capsys, train_argv(tiny_data, run, "run.steps=8"), ".metadata refers to posix.mkdir",
            "refusing to unpickle")
    refused(capsys, ["export", "--run-dir", run, "--out", tmp_path / "m"], ".metadata refers to posix.mkdir")
    assert not marker.exists() and not (tmp_path / "m").exists() and tree(run) == before


@rel("security", "no unpickling of user files", expect="source scan: every torch.load passes weights_only=True; "
     "no pickle.load(s) outside the checkpoint metadata allow-list")
def test_every_torch_load_is_weights_only():
    loads = _calls({"torch.load"})
    assert loads, "expected the export loader"
    for f, ln, call in loads:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, f"{f}:{ln}"
    assert [(f, ln) for f, ln, _ in _calls({"pickle.load", "pickle.loads", "pickle.Unpickler"})] == []


@rel("security", "paths from configs cannot escape the run directory", expect="a manifest whose shard path is "
     "'../..' outside the dataset: exit 2, one line naming the path and 'inside the dataset directory'")
@pytest.mark.parametrize("bad", ["../../outside.parquet", "/etc/passwd", "tgt/../../x.parquet"])
def test_manifest_paths_stay_inside_the_dataset(tiny_data, tmp_path, capsys, bad):
    def escape(m):
        m["splits"]["tgt/test"][0]["path"] = bad

    d = dataset(tiny_data, tmp_path / "d", rehash=False, manifest=escape)
    refused(capsys, train_argv(d, tmp_path / "run"), f"names shard path {bad!r}", "expected a relative path inside "
            "the dataset directory")
    assert not (tmp_path / "run").exists()


@rel("security", "paths from configs cannot escape the run directory", expect="a run with a config file, data "
     "reached through '..', and checkpoints: every file it writes lies inside the run directory, the dataset and "
     "config are untouched")
def test_training_writes_only_inside_the_run_directory(tiny_data, tmp_path, monkeypatch):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    shutil.copytree(tiny_data, tmp_path / "data")
    (tmp_path / "work" / "c.yaml").write_text("run:\n  checkpoint_every: 2\n  steps: 4\n")
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    assert main(["train", "--config", "../c.yaml", "--data", "../../data", "--run-dir", "runs/r", *BASE]) == 0
    after = tree(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]}
    assert changed and all(p.startswith(os.path.join("work", "sub", "runs", "r") + os.sep) for p in changed), changed
    assert set(before) <= set(after)


@rel("security", "no shell=True with user strings", expect="source scan: no shell=True, os.system, os.popen or "
     "subprocess.getoutput in cctl_rec, datagen, launch, scripts")
def test_no_shell():
    assert [(f, ln) for f, ln, _ in _calls({"os.system", "os.popen", "subprocess.getoutput",
                                            "subprocess.getstatusoutput"})] == []
    shell = []
    for f, ln, call in _calls({"run", "Popen", "call", "check_call", "check_output"}):
        for k in call.keywords:
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                shell.append((f, ln))
    assert shell == []


@rel("security", "no shell=True with user strings", expect="datagen --out with shell metacharacters ('; touch', "
     "'$( )'): the directory is made with that literal name and nothing is run")
def test_shell_metacharacters_in_paths_are_literal(tmp_path, capsys):
    name = "d; touch pwned1 $(touch pwned2) `touch pwned3`"
    assert main(["datagen", "--preset", "tiny", "--scale", "0.05", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert (tmp_path / name / MANIFEST).exists()
    assert not [p for p in glob.glob(os.path.join(REPO, "pwned*")) + glob.glob(str(tmp_path / "pwned*"))]
    assert not glob.glob(os.path.join(os.getcwd(), "pwned*"))
