"""``cctl-rec train --features F --data RAW`` (issue #19): training on the raw logs, the mapping run
once by rank 0 into RUN/prepared/<key>/ (the others wait), reused by a rerun or a resumed run, mapped
again when the config or the data change, and bitwise the run ``prepare`` + ``train`` gives."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from cctl_rec.cli import main
from cctl_rec.data.features import cache
from tests.test_features import SMALL, TINY_FEATURES, _write, raw_tiny  # noqa: F401  (raw_tiny: the fixture)

ARGS = [*SMALL, "run.max_eval_rows=256"]
BUCKETS_16 = "{name: category, hash: {buckets: 16, salt: 7}}"


def _files(root) -> dict[str, bytes]:
    """rel path -> bytes of every file below ``root``."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _m(run_dir) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: m[k] for k in ("target_test", "target_valid", "selector", "reward_mean", "steps", "syncs")}


def _only(run_dir) -> str:
    """The one mapping below RUN/prepared (no temp directory left)."""
    names = os.listdir(run_dir / "prepared")
    assert len(names) == 1 and not names[0].startswith("."), names
    return str(run_dir / "prepared" / names[0])


@pytest.mark.slow  # a prepare and four short trainings: ~40 s on a busy core
def test_training_on_raw_logs_is_prepare_then_train_bitwise_and_resumes(raw_tiny, tmp_path, capsys):
    feats = _write(tmp_path, TINY_FEATURES)
    # the reference: prepare, then train on the prepared dataset
    assert main(["prepare", "--features", feats, "--data", raw_tiny, "--out", str(tmp_path / "prep")]) == 0
    assert main(["train", "--data", str(tmp_path / "prep"), "--run-dir", str(tmp_path / "ref"), *ARGS,
                 "run.steps=10"]) == 0
    # one command on the raw logs
    raw_run = tmp_path / "raw"
    assert main(["train", "--features", feats, "--data", raw_tiny, "--run-dir", str(raw_run), *ARGS,
                 "run.steps=10"]) == 0
    assert _m(raw_run) == _m(tmp_path / "ref")
    mapped = _files(_only(raw_run))
    source = json.loads(mapped.pop("source.json"))
    assert mapped == _files(tmp_path / "prep")  # the mapping is prepare's, byte for byte
    assert source["mapped_by"]["rank"] == 0 and source["features"]["path"] == feats
    assert source["rows"]["tgt/train"] == pq.read_metadata(os.path.join(raw_tiny, "tgt/train/part-0.parquet")).num_rows

    # stopped after 4 steps, rerun: the mapping is reused (not rewritten) and the run resumes, bitwise
    cut = tmp_path / "cut"
    assert main(["train", "--features", feats, "--data", raw_tiny, "--run-dir", str(cut), *ARGS, "run.steps=4",
                 "run.checkpoint_every=2"]) == 0
    path = _only(cut)
    stat = os.stat(os.path.join(path, "source.json"))
    assert main(["train", "--features", feats, "--data", raw_tiny, "--run-dir", str(cut), *ARGS,
                 "run.steps=10"]) == 0
    assert _only(cut) == path and os.stat(os.path.join(path, "source.json")).st_mtime_ns == stat.st_mtime_ns
    assert json.loads((cut / "metrics.json").read_text())["resumed_from_step"] == 4
    assert _m(cut) == _m(tmp_path / "ref")

    # another feature config on that run directory: its checkpoints were trained on the old mapping
    before = _files(cut / "prepared")
    other = _write(tmp_path, TINY_FEATURES.replace(BUCKETS_16, "{name: category, hash: {buckets: 32, salt: 7}}"),
                   "other.yaml")
    capsys.readouterr()
    assert main(["train", "--features", other, "--data", raw_tiny, "--run-dir", str(cut), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cctl-rec train: error: run directory {cut} holds checkpoints of a "
                                              f"run on the mapping {path}, but the feature config {other} differs")
    assert _files(cut / "prepared") == before  # nothing mapped, nothing removed


def test_a_changed_config_or_changed_data_is_mapped_again(raw_tiny, tmp_path, monkeypatch):
    feats = _write(tmp_path, TINY_FEATURES)
    run = tmp_path / "run"
    first, made = cache.ensure_prepared(feats, raw_tiny, str(run))
    assert made and _only(run) == first
    cards = json.loads(open(os.path.join(first, "manifest.json")).read())["schema"]["tgt"]["features"]
    assert {f["name"]: f["cardinality"] for f in cards}["category"] == 17

    # the same inputs again: the mapping is reused, prepare is not called
    import cctl_rec.data.features.prepare as prep

    def no_prepare(*a, **k):
        raise AssertionError("mapped again")

    with monkeypatch.context() as m:
        m.setattr(prep, "prepare", no_prepare)
        assert cache.ensure_prepared(feats, raw_tiny, str(run)) == (first, False)

    # another bucket count: another key; the old mapping (no checkpoint trained on it) goes
    _write(tmp_path, TINY_FEATURES.replace(BUCKETS_16, "{name: category, hash: {buckets: 32, salt: 7}}"))
    second, made = cache.ensure_prepared(feats, raw_tiny, str(run))
    assert not made and second != first and _only(run) == second
    cards = json.loads(open(os.path.join(second, "manifest.json")).read())["schema"]["tgt"]["features"]
    assert {f["name"]: f["cardinality"] for f in cards}["category"] == 33

    # the same config over a raw file rewritten with other rows: mapped again, the new rows read
    data = tmp_path / "data"
    shutil.copytree(raw_tiny, data)
    third, _ = cache.ensure_prepared(feats, str(data), str(run))
    assert third != second  # another --data is another key
    test = data / "tgt" / "test" / "part-0.parquet"
    t = pq.read_table(test)
    pq.write_table(t.slice(0, 100), test)
    fourth, _ = cache.ensure_prepared(feats, str(data), str(run))
    assert fourth != third and _only(run) == fourth
    assert json.loads(open(os.path.join(fourth, "source.json")).read())["rows"]["tgt/test"] == 100


def test_features_needs_local_raw_data(tmp_path, capsys):
    feats = _write(tmp_path, TINY_FEATURES)
    assert main(["train", "--features", feats, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("cctl-rec train: error: --features needs --data, the directory of the raw logs the config's "
                   "files are relative to")
    with pytest.raises(ValueError, match=r"^--data s3://bucket/raw: with --features, --data is the raw logs' "
                                         r"directory, read locally; expected a local path"):
        cache.ensure_prepared(feats, "s3://bucket/raw", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit, msg", [
    (("column: uid, space: user, token: user, dtype: int64", "column: user, space: user, token: user, dtype: int64"),
     "lacks column 'user'"),
    (("buckets: 16, salt: 7", "buckets: 0"), "hash.buckets must be in [1,"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_directory(raw_tiny, tmp_path, capsys, edit, msg):
    feats = _write(tmp_path, TINY_FEATURES.replace(*edit, 1))
    run = tmp_path / "run"
    assert main(["train", "--features", feats, "--data", raw_tiny, "--run-dir", str(run), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cctl-rec train: error: ") and msg in err
    assert not run.exists()  # nothing half-written: no run directory, no mapping


def test_a_cached_mapping_of_other_inputs_is_refused(raw_tiny, tmp_path):
    """A complete mapping under this key whose source.json names other inputs (copied from another
    run directory, or edited) is not used."""
    feats = _write(tmp_path, TINY_FEATURES)
    path, _ = cache.ensure_prepared(feats, raw_tiny, str(tmp_path / "run"))
    src = json.loads(open(os.path.join(path, "source.json")).read())
    src["features"]["sha256"] = "0" * 64
    open(os.path.join(path, "source.json"), "w").write(json.dumps(src))
    with pytest.raises(ValueError, match=r"the cached mapping .* is not this feature config's mapping of these raw "
                                         r"logs: the feature config .* differs .*; remove .* to map again$"):
        cache.ensure_prepared(feats, raw_tiny, str(tmp_path / "run"))


def test_a_waiting_rank_gives_up_with_one_line(raw_tiny, tmp_path):
    feats = _write(tmp_path, TINY_FEATURES)
    with pytest.raises(ValueError, match=r"^rank 1 waited 0.6 s for rank 0 to map the raw logs into .*/prepared/"
                                         r"[0-9a-f]{16} and it is not there; rank 0 failed"):
        cache.ensure_prepared(feats, raw_tiny, str(tmp_path / "run"), rank=1, timeout=0.6)
    assert not (tmp_path / "run").exists()


def test_the_train_component_passes_the_feature_config():
    from launch import components

    args = " ".join(components.train(config="configs/cctl_tiny.yaml", data="raw", features="f.yaml",
                                     run_dir="runs/x").roles[0].args)
    assert "cctl_rec.cli train --config configs/cctl_tiny.yaml --run-dir runs/x --data raw --features f.yaml" in args
    with pytest.raises(ValueError, match="--features f.yaml needs --data"):
        components.train(features="f.yaml")


def _two_ranks(rank, world, feats, raw, run_dir):
    """Rank 0 maps (slowed by 1.5 s so that rank 1 must wait); returns what each rank did."""
    import time

    import cctl_rec.data.features.prepare as prep

    calls = []
    real = prep.prepare

    def slow(*a, **k):
        calls.append(os.getpid())
        time.sleep(1.5)
        return real(*a, **k)

    prep.prepare = slow
    t0 = time.monotonic()
    path, made = cache.ensure_prepared(feats, raw, run_dir, rank=rank, timeout=120)
    return {"path": path, "made": made, "calls": len(calls), "seconds": time.monotonic() - t0, "pid": os.getpid()}


@pytest.mark.slow
@pytest.mark.dist
def test_on_two_ranks_rank_0_maps_and_rank_1_waits(raw_tiny, tmp_path):
    from tests.dist_harness import run_distributed

    feats = _write(tmp_path, TINY_FEATURES)
    r0, r1 = run_distributed(_two_ranks, 2, feats, raw_tiny, str(tmp_path / "run"))
    assert r0["path"] == r1["path"] == _only(tmp_path / "run")
    assert (r0["calls"], r1["calls"]) == (1, 0) and r0["made"] and not r1["made"]
    assert r1["seconds"] >= 1.5  # it waited for rank 0's mapping
    assert json.loads(open(os.path.join(r0["path"], "source.json")).read())["mapped_by"]["pid"] == r0["pid"]

