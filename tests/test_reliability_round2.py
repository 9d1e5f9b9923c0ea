"""Issue #20: bad input, round 2 — run-directory identity, bounded reads and values, ids against
the table they are looked up in, undefined metrics, disk errors from torch / pyarrow / DCP.

Like tests/test_reliability.py, each test drives ``cctl-rec`` and asserts the exit code, one error
line on stderr (no traceback) naming the file / key / value, and that nothing was written or the
previous state is byte-identical. Each is one row of docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cctl_rec.cli import main
from cctl_rec.data.manifest import MANIFEST
from tests.test_reliability import col, dataset, refused, train_argv, tree
from tests.tinydata import N_ITEMS, write_tiny

rel = pytest.mark.reliability


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


def _edit_json(path, change) -> None:
    with open(path) as f:
        d = json.load(f)
    change(d)
    with open(path, "w") as f:
        json.dump(d, f)


# ----------------------------------------------------------------------------- a run directory is one run


@rel("artifacts", "a rerun with another seed or dataset (#20)")
@pytest.mark.parametrize("what", ["seed", "dataset"])
def test_rerun_with_another_seed_or_dataset_is_refused(trained, tiny_data, tmp_path, capsys, what):
    """Rerunning a finished run directory with another run.seed, or with --data pointing at another
    dataset of the same schema: exit 2, one line naming the checkpoint and 'seed' / 'dataset' (the
    fingerprint covers the seed and the manifest's sha256); the run directory is byte-identical."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = tree(run)
    if what == "seed":
        argv = train_argv(tiny_data, run, "run.steps=8", "run.seed=1")
        needle = "seed is '0' there, '1' here"
    else:
        other = write_tiny(str(tmp_path / "other"), seed=1)
        argv = train_argv(other, run, "run.steps=8")
        needle = "dataset is 'manifest sha256 "
    refused(capsys, argv, "step-00000004 was made by a different model or config", needle, "use a new --run-dir")
    assert tree(run) == before


@rel("artifacts", "a second writer on one run directory (#20)", expect="while one `train` holds the run "
     "directory's lock (fcntl.flock on RUN/.lock), a second is refused at once: exit 2 within seconds, one line "
     "naming the directory and the holder's pid; the directory is byte-identical")
def test_second_writer_is_refused_at_once(trained, tiny_data, tmp_path, capsys):
    from cctl_rec.train.rundir import run_dir_lock

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with run_dir_lock(str(run)):  # a real flock: a second open file description cannot take it
        before = tree(run)
        t0 = time.monotonic()
        refused(capsys, train_argv(tiny_data, run, "run.steps=8"), f"run directory {run} is in use by another "
                f"cctl-rec train (pid {os.getpid()})", "one writer per run directory")
        assert time.monotonic() - t0 < 60
        assert tree(run) == before


@rel("artifacts", "a second writer on one run directory (#20)", expect="checkpoint temp directories are named "
     "per process (.step-N.tmp-<pid>) and atomic writes use .name.tmp-<pid>-<hex>: two writers never share a temp "
     "name")
def test_temp_names_are_unique_per_process(tiny_data, tmp_path, monkeypatch):
    from cctl_rec.data import manifest
    from cctl_rec.train import checkpoint as ck

    ids, temps = [], []
    real_save, real_temp = ck.dcp.save, manifest.temp_name
    monkeypatch.setattr(ck.dcp, "save", lambda state, checkpoint_id, **kw: (
        ids.append(checkpoint_id), real_save(state, checkpoint_id=checkpoint_id, **kw)))
    monkeypatch.setattr(manifest, "temp_name", lambda p: temps.append(real_temp(p)) or temps[-1])
    assert main(train_argv(tiny_data, tmp_path / "run", "run.steps=2")) == 0
    # every DCP write lands in this process's temp directory (the last sync's presync/ inside it)
    assert ids and all(f".step-00000002.tmp-{os.getpid()}" in i.split(os.sep)[-2:] for i in ids)
    assert os.path.basename(ids[-1]) == f".step-00000002.tmp-{os.getpid()}"
    assert temps and all(f".tmp-{os.getpid()}-" in os.path.basename(t) for t in temps)


# ----------------------------------------------------------------------------- config values


BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
run:
  precision: *h
"""


@rel("config", "an alias bomb in a string field (#20)")
@pytest.mark.parametrize("where", ["file", "override"])
def test_alias_bomb_is_refused_quickly(tiny_data, tmp_path, capsys, where):
    """A ~500-byte YAML alias bomb (9^8 strings) in a string field, in a config file or an override:
    exit 2 within seconds, one line under 1000 characters naming the file or override and the bound;
    the value is never expanded or echoed; no run directory."""
    argv = train_argv(tiny_data, tmp_path / "run")
    if where == "file":
        (tmp_path / "bomb.yaml").write_text(BOMB)
        argv += ["--config", str(tmp_path / "bomb.yaml")]
        needle = f"config file {tmp_path / 'bomb.yaml'} expands to more than 10,000 values"
    else:
        flow = "[" + ", ".join(["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + ["*a"] * 8) + "]"
        for name in "bcdefg":
            flow = f"[&{name} {flow}, " + ", ".join([f"*{name}"] * 8) + "]"
        argv.append(f"run.precision={flow}")
        needle = "expands to more than 10,000 values"
    t0 = time.monotonic()
    line = refused(capsys, argv, needle, "YAML anchors and aliases are counted at every use")
    assert time.monotonic() - t0 < 30 and len(line) < 1000
    assert not (tmp_path / "run").exists()


@rel("config", "values that failed mid-run (#20)")
@pytest.mark.parametrize("override,msg", [
    ("run.threads=-1", "run.threads must be in [0, 4096] (0: torch's default), got -1"),
    ("data.src_ratio=0.001", "data.src_ratio=0.001 gives round(128 x 0.001) = 0 source rows per step; expected 0 "
                             "or at least 0.0039"),
    ("model.embedding_dim=3", "model.embedding_dim must be a multiple of 4 in [4, 65536]"),
    ("run.max_eval_rows=-1", "run.max_eval_rows must be >= 0 (0: every row), got -1"),
    ("run.seed=-1", "run.seed must be in [0, 2^62), got -1"),
    ("data.batch_size=100000000000000000000", "data.batch_size must be a 64-bit integer"),
    ("model.tower=[1000000]", "model.tower must list at most 64 widths of at most 65536"),
    ("data.max_seq_len=100000000", "data.max_seq_len must be in [1, 4096]"),
], ids=["threads", "src_ratio", "embedding_dim", "max_eval_rows", "seed", "huge-int", "huge-width", "huge-seq"])
def test_values_checked_before_anything_runs(tiny_data, tmp_path, capsys, override, msg):
    """Values that used to pass the config check and fail later (a traceback mid-run, a half-made
    run directory, or only after the whole run had trained): exit 2 before a run directory is made,
    one line naming the key, the value and the range."""
    refused(capsys, train_argv(tiny_data, tmp_path / "run", override), msg)
    assert not (tmp_path / "run").exists()


@rel("config", "values that failed mid-run (#20)", expect="RANK / WORLD_SIZE of 0 or out of range (was: 'slice "
     "step cannot be zero'): exit 2, one line naming both; no run directory")
@pytest.mark.parametrize("rank,world", [("0", "0"), ("3", "2"), ("x", "2")])
def test_bad_rank_or_world_size(tiny_data, tmp_path, capsys, monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    msg = "RANK must be an integer >= 0 (as torchrun sets it), got 'x'" if rank == "x" else \
        f"RANK / WORLD_SIZE must be integers with 0 <= RANK < WORLD_SIZE, got RANK='{rank}' WORLD_SIZE='{world}'"
    refused(capsys, train_argv(tiny_data, tmp_path / "run"), msg)
    assert not (tmp_path / "run").exists()


@rel("config", "a config file that is not a small YAML text file (#20)")
@pytest.mark.parametrize("kind,msg", [
    ("dev-zero", "is a character device (a link to /dev/zero), not a regular file"),
    ("latin-1", "is not UTF-8 text (byte 13"),
    ("deep", "nests"),
    ("huge", "bytes, more than the 1,048,576 a config file may have"),
], ids=["dev-zero", "latin-1", "deep", "huge"])
def test_config_file_that_is_not_small_yaml_text(tiny_data, tmp_path, capsys, kind, msg):
    """A config file that is a symlink to /dev/zero, Latin-1 bytes, nested 100,000 deep, or 2 MB:
    exit 2 at once, one line naming the file and what was expected; no run directory."""
    cfg = tmp_path / "c.yaml"
    if kind == "dev-zero":
        os.symlink("/dev/zero", cfg)
    elif kind == "latin-1":
        cfg.write_bytes(b"run:\n  seed: \xe9\n")
    elif kind == "deep":
        cfg.write_text("run: " + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        cfg.write_text("# " + "x" * (2 << 20) + "\n")
    refused(capsys, train_argv(tiny_data, tmp_path / "run") + ["--config", str(cfg)], str(cfg), msg)
    assert not (tmp_path / "run").exists()


@rel("data", "a datagen scale that leaves a split empty (#20)", expect="datagen --scale 1e-9 (3 target rows: one "
     "split empty): exit 2 before anything is written, one line naming the scale, the empty split and the rows per "
     "split; no output directory (it used to exit 0 with empty splits that train then refused)")
def test_datagen_scale_that_leaves_a_split_empty(tmp_path, capsys):
    refused(capsys, ["datagen", "--preset", "tiny", "--scale", "1e-9", "--out", tmp_path / "d"],
            "--scale 1e-09 gives the tiny preset 3 tgt row(s), leaving tgt/valid with 0 rows",
            "expected a larger --scale")
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- reads bounded, JSON validated


@rel("data", "a shard that is a special file (#20)")
@pytest.mark.parametrize("bytes_known", [False, True], ids=["no-bytes", "bytes"])
def test_shard_linked_to_dev_zero(tiny_data, tmp_path, capsys, bytes_known):
    """A shard symlinked to /dev/zero (its manifest entry with or without `bytes`): exit 2 at once,
    one line naming the file and 'not a regular file' (it is never read); no run directory."""
    def drop(m):
        if not bytes_known:
            for e in m["splits"]["tgt/valid"]:
                e.pop("bytes")

    d = dataset(tiny_data, tmp_path / "d", manifest=drop)
    shard = os.path.join(d, "tgt/valid/part-00001.parquet")
    os.remove(shard)
    os.symlink("/dev/zero", shard)
    t0 = time.monotonic()
    refused(capsys, train_argv(d, tmp_path / "run"), f"data file {shard} is a character device (a link to "
            "/dev/zero), not a regular file; refusing to read it")
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()


MANIFEST_CASES = [
    ("cardinality-string", lambda m: m["schema"]["tgt"]["features"][0].update(cardinality="300"),
     "key 'schema.tgt.features.0.cardinality': input should be a valid integer, got '300'"),
    ("no-tgt-schema", lambda m: m["schema"].pop("tgt"), "missing keys ['schema.tgt']"),
    ("rows-negative", lambda m: m["splits"]["tgt/test"][0].update(rows=-5),
     "key 'splits.tgt/test.0.rows': input should be greater than or equal to 0, got -5"),
    ("splits-list", lambda m: m.update(splits=[1, 2]), "key 'splits': input should be a valid dictionary"),
    ("sha256-junk", lambda m: m["splits"]["src/train"][1].update(sha256="zz" * 40),
     "key 'splits.src/train.1.sha256': string should match pattern"),
]


@rel("data", "a manifest of the wrong shape (#20)")
@pytest.mark.parametrize("name,change,msg", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_of_the_wrong_shape(tiny_data, tmp_path, capsys, name, change, msg):
    """manifest.json with a key of the wrong JSON type or range (validated with pydantic): exit 2,
    one line naming manifest.json, the key path and the value; no run directory."""
    d = dataset(tiny_data, tmp_path / "d", manifest=change)
    refused(capsys, train_argv(d, tmp_path / "run"), os.path.join(d, MANIFEST), msg)
    assert not (tmp_path / "run").exists()


@rel("data", "a manifest of the wrong shape (#20)", expect="a manifest nested 100,000 deep, or not UTF-8: exit 2, "
     "one line naming manifest.json (no RecursionError, no decode error without the file); no run directory")
@pytest.mark.parametrize("raw,msg", [
    (b"[" * 100_000 + b"]" * 100_000, "nests lists or objects deeper than"),
    (b'{"format": "cctl-rec/v1\xff"}', "is not UTF-8 text (byte 23"),
], ids=["deep", "not-utf8"])
def test_manifest_deep_or_not_utf8(tiny_data, tmp_path, capsys, raw, msg):
    d = dataset(tiny_data, tmp_path / "d")
    (tmp_path / "d" / MANIFEST).write_bytes(raw)
    refused(capsys, train_argv(d, tmp_path / "run"), os.path.join(d, MANIFEST), msg)
    assert not (tmp_path / "run").exists()


@rel("artifacts", "a tampered metrics.json, trainer.json or serving.json (#20)")
@pytest.mark.parametrize("what", ["metrics-list", "metrics-auc-string", "fingerprint-list", "step-string",
                                  "serving-dim-string", "serving-huge-table", "serving-deep"])
def test_tampered_json_artifacts(trained, exported, tiny_data, tmp_path, capsys, what):
    """metrics.json (eval), a checkpoint's trainer.json (train resume, export) or serving.json
    (predict) of the wrong JSON type, with a value of the wrong type, or describing tables the
    weights do not have: exit 2, one line naming the file and the key; nothing is written."""
    run, model, out = tmp_path / "run", tmp_path / "m", tmp_path / "p.parquet"
    shutil.copytree(trained, run)
    shutil.copytree(exported, model)
    trainer = run / "checkpoints" / "step-00000004" / "trainer.json"
    if what == "metrics-list":
        (run / "metrics.json").write_text("[1, 2]")
        argv, msg = ["eval", run], [f"{run / 'metrics.json'}: key '(top level)': input should be a valid dictionary"]
    elif what == "metrics-auc-string":
        _edit_json(run / "metrics.json", lambda m: m["target_test"].update(auc="0.7"))
        argv, msg = ["eval", run], ["key 'target_test.auc': input should be a valid number, got '0.7'"]
    elif what == "fingerprint-list":
        _edit_json(trainer, lambda m: m.update(fingerprint=["model"]))
        argv, msg = train_argv(tiny_data, run, "run.steps=8"), [str(trainer), "key 'fingerprint': input should be "
                                                                             "a valid dictionary"]
    elif what == "step-string":
        _edit_json(trainer, lambda m: m.update(step="4"))
        argv, msg = ["export", "--run-dir", run, "--out", tmp_path / "m2"], [str(trainer), "key 'step'"]
    elif what == "serving-dim-string":
        _edit_json(model / "serving.json", lambda m: m.update(embedding_dim="8"))
        argv, msg = ["predict", "--model", model, "--data", tiny_data, "--out", out], [
            "serving.json: key 'embedding_dim': input should be a valid integer, got '8'"]
    elif what == "serving-huge-table":
        def huge(m):
            for f in m["schema"]["features"]:
                if f["name"] in ("user_id",):
                    f["cardinality"] = 10 ** 12
        _edit_json(model / "serving.json", huge)
        argv, msg = ["predict", "--model", model, "--data", tiny_data, "--out", out], [
            "model.pt does not match", "table user_id is 300 x 8 in model.pt, 1000000000000 x 8 in serving.json"]
    else:
        (model / "serving.json").write_text("{\"a\": " + "[" * 50_000 + "]" * 50_000 + "}")
        argv, msg = ["predict", "--model", model, "--data", tiny_data, "--out", out], ["serving.json nests"]
    before = tree(tmp_path)
    refused(capsys, argv, *msg)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- ids and undefined metrics


@rel("data", "ids >= table size", expect="*#20*: a manifest giving `seq` a larger cardinality than the item table "
     "it is looked up in, or a feature a smaller table than its cardinality: exit 2, one line naming the feature, "
     "its cardinality and the table's rows; no run directory")
@pytest.mark.parametrize("feature,table,card", [("seq", "item_id", 5000), ("brand", "category", None)],
                         ids=["seq-larger-than-its-table", "feature-in-a-smaller-table"])
def test_ids_checked_against_the_table_they_are_looked_up_in(tiny_data, tmp_path, capsys, feature, table, card):
    def change(m):
        for d in ("src", "tgt"):
            for f in m["schema"][d]["features"]:
                if f["name"] == feature:
                    f["table"] = table
                    if card:
                        f["cardinality"] = card

    d = dataset(tiny_data, tmp_path / "d", manifest=change)
    line = refused(capsys, train_argv(d, tmp_path / "run"), f"feature '{feature}' has cardinality",
                   f"is looked up in table '{table}' of", "expected the same cardinality for every feature of a table")
    assert (str(N_ITEMS) in line) if feature == "seq" else True
    assert not (tmp_path / "run").exists()


@rel("data", "a split with one label class (#20)", expect="a target test split whose labels are all 0: training "
     "exits 0, metrics.json reports target_test.auc null (undefined) and logloss a number, never AUC 0.0, and a "
     "warning names the split")
def test_one_label_class_reports_auc_as_undefined(tiny_data, tmp_path, capsys):
    d = tiny_data
    for shard in range(2):
        d = dataset(d, tmp_path / f"d{shard}", split="tgt/test", shard=shard,
                    table=lambda t: col(t, "label", pa.array(np.zeros(t.num_rows, np.int8))))
    assert main(train_argv(d, tmp_path / "run", "run.steps=2", "run.max_eval_rows=0")) == 0
    err = capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["target_test"]["auc"] is None and m["target_test"]["logloss"] > 0
    assert m["target_valid"]["auc"] is not None
    assert any("WARNING" in ln and "AUC on tgt/test is undefined" in ln and "one class" in ln
               for ln in err.splitlines()), err
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert "| n/a |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- disk errors


def _runtime_enospc(*_args, **_kwargs):
    """What torch raises for a real full disk under DCP: RuntimeError raised while handling the
    OSError (measured on a full tmpfs: '[enforce fail at inline_container.cc:672] . unexpected pos')."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\n"
                           "Exception raised from ... (most recent call first):\nframe #0: c10::Error") from None


@rel("fault", "a full disk simulated", expect="*#20*: torch's RuntimeError for a real ENOSPC during a DCP "
     "checkpoint (raised while handling the OSError, which DCP's gather of the ranks' errors drops; the disk has "
     "no space left): exit 1, one line naming the checkpoint and 'No space left on device'; the temp directory is "
     "gone and the previous checkpoint and metrics.json are byte-identical")
def test_full_disk_as_torch_raises_it(tiny_data, tmp_path, capsys, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    run = tmp_path / "run"
    assert main(train_argv(tiny_data, run, "run.steps=3")) == 0
    ckpts, metrics = tree(run / "checkpoints"), (run / "metrics.json").read_bytes()
    real, calls = fs._write_item, []

    def write_item(*args, **kwargs):
        calls.append(1)
        return _runtime_enospc() if len(calls) > 10 else real(*args, **kwargs)

    real_statvfs = os.statvfs

    def full(path):  # the run's disk as a real ENOSPC leaves it: nothing available
        st = real_statvfs(path)
        if not str(path).startswith(str(run)):
            return st
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, 0, 0, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr(fs, "_write_item", write_item)
    monkeypatch.setattr(os, "statvfs", full)
    capsys.readouterr()
    line = refused(capsys, train_argv(tiny_data, run, "run.steps=6"), "No space left on device while writing "
                   "checkpoint", "step-00000006", "the previous checkpoints are intact", rc=1)
    assert "frame #" not in line
    assert tree(run / "checkpoints") == ckpts and (run / "metrics.json").read_bytes() == metrics


def _du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@rel("fault", "a full disk simulated", expect="*#20*: a REAL full disk: the run directory on a tmpfs with room "
     "for half a checkpoint more; the rerun's checkpoint write fails inside torch: exit 1, one line naming the "
     "checkpoint and 'No space left on device'; the previous checkpoint and metrics.json are byte-identical "
     "(skipped where a tmpfs cannot be mounted)")
def test_real_full_disk_during_checkpoint(tiny_data, tmp_path, capsys):
    import ctypes

    run0 = tmp_path / "run0"
    assert main(train_argv(tiny_data, run0, "run.steps=3")) == 0
    size = _du(run0) + _du(run0 / "checkpoints" / "step-00000003") // 2
    mnt = tmp_path / "small"
    mnt.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded (find_library would run ldconfig)
    if libc.mount(b"tmpfs", str(mnt).encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
        pytest.skip(f"cannot mount a tmpfs here ({os.strerror(ctypes.get_errno())}; needs root)")
    try:
        run = mnt / "run"
        shutil.copytree(run0, run)
        ckpts, metrics = tree(run / "checkpoints"), (run / "metrics.json").read_bytes()
        capsys.readouterr()
        refused(capsys, train_argv(tiny_data, run, "run.steps=6"), "No space left on device while writing "
                "checkpoint", "step-00000006", "the previous checkpoints are intact", rc=1)
        assert tree(run / "checkpoints") == ckpts and (run / "metrics.json").read_bytes() == metrics
    finally:
        libc.umount2(str(mnt).encode(), 2)  # MNT_DETACH


@rel("fault", "a read-only or failing disk (#20)")
@pytest.mark.parametrize("where", ["parquet-read-eio", "metrics-write-erofs", "export-read-eio"])
def test_io_errors_are_one_line_exit_1(trained, tiny_data, tmp_path, capsys, monkeypatch, where):
    """EIO from pyarrow while a row group is read, EROFS when metrics.json is written, EIO from
    DCP while export reads a checkpoint: exit 1 (the machine, not the input), one line with the
    error; no traceback, nothing half-written."""
    import cctl_rec.train.loop as loop

    if where == "parquet-read-eio":
        real = pq.ParquetFile.read_row_group

        def eio(self, *a, **k):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(pq.ParquetFile, "read_row_group", eio)
        argv, needle = train_argv(tiny_data, tmp_path / "run", "run.steps=2"), "Input/output error"
    elif where == "metrics-write-erofs":
        real = loop.atomic_write_json

        def erofs(path, obj):
            if path.endswith("metrics.json"):
                raise OSError(errno.EROFS, "Read-only file system", path)
            return real(path, obj)

        monkeypatch.setattr(loop, "atomic_write_json", erofs)
        argv, needle = train_argv(tiny_data, tmp_path / "run", "run.steps=2"), "Read-only file system"
    else:
        import torch.distributed.checkpoint.filesystem as fs

        def eio_reader(*a, **k):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(fs.FileSystemReader, "read_data", eio_reader)
        argv, needle = ["export", "--run-dir", trained, "--out", tmp_path / "m"], "Input/output error"
    line = refused(capsys, argv, needle, rc=1)
    assert "Traceback" not in line
    assert not (tmp_path / "m").exists() and not (tmp_path / "run" / "metrics.json").exists()
