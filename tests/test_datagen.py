"""Synthetic generator: statistics of ``tiny``, determinism, resume, manifest, CLI errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cctl_rec.data.manifest import (MANIFEST, read_manifest, sha256_file, shard_paths,
                                    verify_shard, write_manifest)
from cctl_rec.datagen import writer
from cctl_rec.datagen.pipeline import generate
from cctl_rec.datagen.presets import PRESETS, resolve

TINY = PRESETS["tiny"]


def _shas(manifest: dict) -> dict[str, str]:
    return {e["path"]: e["sha256"] for entries in manifest["splits"].values() for e in entries}


def _read(root: str, manifest: dict, split: str, columns=None):
    return pa.concat_tables([pq.read_table(p, columns=columns)
                             for p in shard_paths(root, manifest, split)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny"))
    manifest = generate(root, "tiny", workers=1, progress=False)
    return root, manifest


def test_tiny_statistics(tiny):
    root, m = tiny
    tgt = [_read(root, m, s, ["user_id", "item_id", "user_in_other", "item_in_other", "label"])
           for s in ("tgt/train", "tgt/valid", "tgt/test")]
    users = np.concatenate([t["user_id"].to_numpy() for t in tgt])
    u_in = np.concatenate([t["user_in_other"].to_numpy() for t in tgt])
    items = np.concatenate([t["item_id"].to_numpy() for t in tgt])
    i_in = np.concatenate([t["item_in_other"].to_numpy() for t in tgt])
    _, first = np.unique(users, return_index=True)
    assert abs(u_in[first].mean() - TINY.user_overlap) <= 0.01
    _, first = np.unique(items, return_index=True)
    assert abs(i_in[first].mean() - TINY.item_overlap) <= 0.01
    assert abs(m["stats"]["user_overlap"] - TINY.user_overlap) <= 0.01
    assert abs(m["stats"]["item_overlap"] - TINY.item_overlap) <= 0.01

    labels = np.concatenate([t["label"].to_numpy() for t in tgt])
    assert abs(labels.mean() - TINY.tgt.ctr) <= 0.004
    src = _read(root, m, "src/train", ["label", "is_harmful", "user_id", "user_in_other"])
    assert abs(pc.mean(src["label"]).as_py() - TINY.src.ctr) <= 0.006
    assert abs(pc.mean(src["is_harmful"].cast("int8")).as_py() - TINY.harmful_frac) <= 0.01
    assert abs(m["stats"]["src"]["harmful_share"] - TINY.harmful_frac) <= 0.01
    # user_in_other agrees with the id layout: target users are [0, tgt.users)
    s_users, s_in = src["user_id"].to_numpy(), src["user_in_other"].to_numpy()
    assert np.array_equal(s_in, s_users < TINY.tgt.users)
    rows = m["stats"]["rows"]
    assert rows["src/train"] == TINY.src.samples
    assert rows["tgt/train"] == pytest.approx(0.8 * TINY.tgt.samples, abs=1)


def test_columns_and_id_ranges(tiny):
    root, m = tiny
    for split in m["splits"]:
        dom = split.split("/")[0]
        schema = {f["name"]: f for f in m["schema"][dom]["features"]}
        t = _read(root, m, split)
        expected = list(schema) + ["other_seq", "user_in_other", "item_in_other", "label", "ts"]
        expected += ["is_harmful"] if dom == "src" else []
        assert t.column_names == expected
        n_items = schema["item_id"]["cardinality"]
        for name, f in schema.items():
            col = t[name]
            if name == "seq":
                assert pa.types.is_list(col.type) and pa.types.is_int32(col.type.value_type)
                assert pc.max(pc.list_value_length(col)).as_py() <= m["max_seq_len"]
                col = pc.list_flatten(col)
            assert str(col.type) == "int32", name
            assert pc.min(col).as_py() >= 0 and pc.max(col).as_py() < f["cardinality"], name
        other = pc.list_flatten(t["other_seq"])
        assert pc.min(other).as_py() >= 0 and pc.max(other).as_py() < n_items
        lens = pc.list_value_length(t["other_seq"]).to_numpy()
        assert (lens[~t["user_in_other"].to_numpy()] == 0).all()
        assert str(t["label"].type) == "int8" and str(t["ts"].type) == "int64"
        assert set(np.unique(t["label"].to_numpy())) <= {0, 1}
        assert (np.diff(t["ts"].to_numpy()) >= 0).all() or len(m["splits"][split]) > 1
    # target splits are consecutive ts ranges
    ts = {s: _read(root, m, s, ["ts"])["ts"].to_numpy() for s in ("tgt/train", "tgt/valid", "tgt/test")}
    assert ts["tgt/train"].max() < ts["tgt/valid"].min() <= ts["tgt/valid"].max() < ts["tgt/test"].min()


def test_manifest_written_last_and_readable(tiny):
    root, m = tiny
    assert read_manifest(root) == m
    assert set(m["splits"]) == {"tgt/train", "tgt/valid", "tgt/test", "src/train"}
    for key in ("format", "schema", "split_rule", "max_seq_len", "preset", "params", "seed",
                "version", "stats"):
        assert key in m
    mtime = os.path.getmtime(os.path.join(root, MANIFEST))
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f != MANIFEST:
                assert os.path.getmtime(os.path.join(dirpath, f)) <= mtime, f
    entries = [e for v in m["splits"].values() for e in v]
    assert all(verify_shard(root, e) for e in entries)
    assert sum(e["rows"] for e in entries) == TINY.tgt.samples + TINY.src.samples


@pytest.mark.slow  # spawned worker processes
def test_workers_give_identical_bytes(tiny, tmp_path):
    _, m1 = tiny
    m2 = generate(str(tmp_path), "tiny", workers=2, progress=False)
    assert _shas(m1) == _shas(m2)


def test_ranks_split_the_work(tiny, tmp_path):
    _, m1 = tiny
    out = str(tmp_path)
    assert generate(out, "tiny", rank=1, world_size=2, progress=False) is None
    assert not os.path.exists(os.path.join(out, MANIFEST))
    m = generate(out, "tiny", rank=0, world_size=2, progress=False, wait_timeout_s=5)
    assert _shas(m) == _shas(m1)


@pytest.mark.reliability("fault", "a kill during datagen", expect="the leftovers of a killed run (a temp file, a "
                         "lost sidecar, a truncated shard, no manifest): the rerun regenerates exactly those shards, "
                         "byte-identical, and removes the temp file")
def test_resume_after_kill(tmp_path, monkeypatch):
    out = str(tmp_path)
    m = generate(out, "tiny", scale=0.3, progress=False)
    shas = _shas(m)
    a, b, c = [e["path"] for e in m["splits"]["src/train"]][:3]
    # a killed run: one shard never finished (only a temp file), one lost its sidecar,
    # one was truncated; and no manifest yet
    os.remove(os.path.join(out, a))
    for p in (a + ".sha256", a + ".stats.json"):
        os.remove(os.path.join(out, p))
    temp = os.path.join(out, "src/train", "." + a.rsplit("/", 1)[-1] + ".tmp-999-deadbeef")
    with open(temp, "wb") as f:
        f.write(b"PAR1 partial")
    os.remove(os.path.join(out, b + ".sha256"))
    with open(os.path.join(out, c), "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(out, MANIFEST))

    written = []
    real = writer.Generator.shard_table

    def spy(self, d, split, shard, *args, **kw):
        written.append(f"{d}/{split}/part-{shard:05d}.parquet")
        return real(self, d, split, shard, *args, **kw)

    monkeypatch.setattr(writer.Generator, "shard_table", spy)
    m2 = generate(out, "tiny", scale=0.3, progress=False)
    assert sorted(written) == sorted([a, b, c])  # verified shards were skipped
    assert _shas(m2) == shas
    assert not os.path.exists(temp)
    assert all(verify_shard(out, e) for v in m2["splits"].values() for e in v)


@pytest.mark.reliability("fault", "a kill during datagen", expect="an interrupt in the middle of a shard write: "
                         "no shard, temp file or manifest is left")
def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    out = str(tmp_path)

    def boom(table, sink, rows):
        sink.write(b"PAR1 half a file")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(writer, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(out, "tiny", scale=0.2, progress=False)
    left = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".parquet") or ".tmp-" in f]
    assert left == []
    assert not os.path.exists(os.path.join(out, MANIFEST))


def test_other_params_refused(tmp_path):
    out = str(tmp_path)
    generate(out, "tiny", scale=0.05, progress=False)
    with pytest.raises(ValueError, match="other parameters"):
        generate(out, "tiny", scale=0.05, seed=1, progress=False)
    with pytest.raises(ValueError, match=r"other parameters \(differs in knobs.harm_strength"):
        generate(out, "tiny", scale=0.05, knobs={"harm_strength": 0.5}, progress=False)


def test_data_written_before_a_knob_existed_resumes(tmp_path):
    """A directory whose datagen-params.json predates harm_quality resumes (its neutral value)."""
    out = str(tmp_path)
    generate(out, "tiny", scale=0.05, progress=False)
    path = tmp_path / "datagen-params.json"
    old = json.loads(path.read_text())
    del old["knobs"]["harm_quality"]
    path.write_text(json.dumps(old))
    generate(out, "tiny", scale=0.05, progress=False)  # no refusal
    with pytest.raises(ValueError, match=r"differs in knobs.harm_quality"):
        generate(out, "tiny", scale=0.05, knobs={"harm_quality": 1.0}, progress=False)


def test_read_manifest_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_manifest(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other/v9"}))
    with pytest.raises(ValueError, match="format"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "cctl-rec/v1", "splits": {}}))
    with pytest.raises(ValueError, match="missing keys"):
        read_manifest(str(tmp_path))
    _, m = tiny
    write_manifest(str(tmp_path), m)
    assert read_manifest(str(tmp_path)) == m
    with pytest.raises(ValueError, match="split"):
        shard_paths(str(tmp_path), m, "src/test")
    entry = dict(m["splits"]["tgt/test"][0])
    assert not verify_shard(str(tmp_path), entry)  # the shard is not in this directory


def test_sha256_file_matches_hashlib(tiny):
    import hashlib

    root, m = tiny
    e = m["splits"]["tgt/test"][0]
    path = os.path.join(root, e["path"])
    with open(path, "rb") as f:
        assert sha256_file(path) == hashlib.sha256(f.read()).hexdigest() == e["sha256"]


def test_presets_and_scale():
    p = resolve("meituan")
    assert p.tgt.users == 183_000_000 and p.src.samples == 1_200_000_000
    assert p.user_overlap_ids / p.tgt.users == pytest.approx(0.6783, abs=1e-4)
    assert p.item_overlap_ids / p.tgt.items == pytest.approx(0.7026, abs=1e-3)
    half = resolve("small", scale=0.5)
    assert half.tgt.samples == PRESETS["small"].tgt.samples // 2
    assert half.n_users == resolve("small").n_users
    assert resolve("small", scale=0.5, scale_ids=True).tgt.users == PRESETS["small"].tgt.users // 2
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("huge")
    with pytest.raises(ValueError, match="scale"):
        resolve("tiny", scale=0)


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--scale", "0"], "--scale must be > 0"),
    (["--scale", "-1.5"], "--scale must be > 0"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_cli_bad_arguments(argv, needle, tmp_path, capsys):
    from cctl_rec.cli import main

    assert main(["datagen", "--out", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err


def test_cli_unwritable_output(tmp_path, capsys):
    from cctl_rec.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["datagen", "--preset", "tiny", "--out", str(blocker / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not writable" in err and str(blocker) in err, err


def test_cli_generates(tmp_path, capsys):
    from cctl_rec.cli import main

    out = str(tmp_path / "d")
    assert main(["datagen", "--preset", "tiny", "--scale", "0.05", "--out", out,
                 "--max-shards", "1"]) == 0
    m = read_manifest(out)
    assert m["preset"] == "tiny" and m["params"]["max_shards"] == 1
    assert all(len(v) == 1 for v in m["splits"].values())
    assert "wrote" in capsys.readouterr().out


def test_parquet_layout(tiny):
    """zstd, bounded row groups, no dictionaries, BYTE_STREAM_SPLIT ids, delta ts, no list stats."""
    root, m = tiny
    path = shard_paths(root, m, "src/train")[0]
    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups > 1 and all(md.row_group(i).num_rows <= TINY.row_group_rows
                                         for i in range(md.num_row_groups))
    for i in range(md.num_columns):
        col = md.row_group(0).column(i)
        assert col.compression == "ZSTD", col.path_in_schema
        assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(col.encodings), col.path_in_schema
        if col.path_in_schema == "ts":
            assert "DELTA_BINARY_PACKED" in col.encodings and col.is_stats_set
        elif col.path_in_schema in ("seq.list.element", "other_seq.list.element", "user_id"):
            assert "BYTE_STREAM_SPLIT" in col.encodings
            assert col.is_stats_set == (col.path_in_schema == "user_id")


def test_id_types():
    from cctl_rec.datagen.generator import id_type

    assert id_type(2 ** 31) == pa.int32() and id_type(2 ** 31 + 1) == pa.int64()


def test_zipf_rank32_has_the_law_of_zipf_rank():
    from cctl_rec.datagen.hashing import zipf_rank, zipf_rank32

    bits = np.random.default_rng(0).integers(0, 2 ** 32, 400_000, dtype=np.uint64)
    for n, s in ((450, 0.9), (55_000, 0.9), (50, 1.0), (10, 0.0), (1000, 1.5)):
        ref = zipf_rank(bits / 2.0 ** 32, n, s)
        got = zipf_rank32(bits.astype(np.uint32), n, s)
        assert got.dtype == np.int32 and got.min() >= 0 and got.max() < n
        assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 0.01, (n, s)


def test_fast_paths_match_their_reference():
    from cctl_rec.datagen.generator import Generator, _count_le, calibrate
    from cctl_rec.datagen.hashing import hash_factors
    from cctl_rec.datagen.stats import sorted_unique

    rng = np.random.default_rng(1)
    x = rng.integers(0, 2 ** 40, 10_000)
    assert np.array_equal(hash_factors(x, 7, 2), hash_factors(x, 7, 8)[:, :2])
    assert np.array_equal(sorted_unique(x % 5000), np.unique(x % 5000))
    cdf = np.cumsum(rng.random(20))
    cdf /= cdf[-1]
    u = rng.random(10_000)
    assert np.array_equal(_count_le(cdf, u), np.searchsorted(cdf, u, side="right"))
    gen = Generator(calibrate(resolve("tiny"), rows=1000))
    fav = gen.favourites(np.arange(5000))
    combo = (fav[:, 0] * gen.C + fav[:, 1]) * gen.C + fav[:, 2]
    assert np.array_equal(gen.anchors[combo], gen._anchor(fav))


def _reference_sequences(gen, d, uid, ts, fav):
    """The behaviour model of ``Generator.sequences`` written per element, in float64."""
    from cctl_rec.datagen.hashing import permute, splitmix64, zipf_rank

    n_ev, _ = gen._activity(d, uid, ts)
    length = np.minimum(n_ev, gen.max_seq_len)
    row = np.repeat(np.arange(len(uid)), length)
    k = np.arange(len(row)) - np.repeat(np.cumsum(length) - length, length)  # 0.. within a row
    key = (uid[row].astype(np.uint64) << np.uint64(20)) + (n_ev - length)[row].astype(np.uint64)
    h = splitmix64(key + k.astype(np.uint64), gen.dom[d]["seq_salt"])
    code = gen._category_lut(d)[(h >> np.uint64(52)).astype(np.intp)]
    cat = np.where(code < 3, fav[row, np.minimum(code, 2)], code - 3)
    ds, dp = gen.dom[d], gen.p.domain(d)
    r = zipf_rank((h & np.uint64(0xFFFFFFFF)) / 2.0 ** 32, ds["per_cat"], gen.p.knobs["item_zipf"])
    j = permute(r, ds["per_cat"], ds["a_item"], cat * 7919 + 13)
    return length, j * gen.C + cat + dp.item_start


@pytest.mark.parametrize("scale, scale_ids", [(1e-6, False), (1.5, True)])
def test_sequences_follow_the_reference_model(scale, scale_ids):
    """float32 Zipf ranks (< 65,536 items per category) agree with the float64 model but for
    rare one-rank rounding steps; the int64 path (more items per category: the source of
    meituan with --scale-ids 1.5, 82,500) is exact."""
    from cctl_rec.datagen.generator import DAY, T0, Generator, calibrate

    params = calibrate(resolve("meituan", scale=scale, scale_ids=scale_ids), rows=1000)
    gen = Generator(params)
    assert (gen.dom["src"]["per_cat"] >= 1 << 16) == scale_ids  # both paths are tested
    uid = np.random.default_rng(2).integers(0, params.n_users, 3000)
    ts = np.sort(np.random.default_rng(3).integers(T0, T0 + 20 * DAY, 3000))
    fav = gen.favourites(uid)
    for d in ("src", "tgt"):
        off, got, _ = gen.sequences(d, uid, ts, fav)
        length, want = _reference_sequences(gen, d, uid, ts, fav)
        assert np.array_equal(np.diff(off), length) and got.dtype == np.int32
        exact = gen.dom[d]["per_cat"] >= 1 << 16
        same = (got == want).mean()
        assert same == 1.0 if exact else same > 0.99, (d, gen.dom[d]["per_cat"], same)


def test_set_changes_a_generator_knob_and_the_manifest_records_it(tmp_path, capsys):
    from cctl_rec.cli import main

    out = tmp_path / "h"
    assert main(["datagen", "--preset", "tiny", "--scale", "0.2", "--set", "harmful_frac=0.6", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["params"]["knobs"]["harmful_frac"] == 0.6
    assert abs(m["stats"]["src"]["harmful_share"] - 0.6) < 0.02
    for bad, msg in ((["--set", "harm=1"], "not a generator knob"), (["--set", "harmful_frac=2"], "must be in [0, 1]"),
                     (["--set", "harmful_frac"], "expected KNOB=NUMBER")):
        assert main(["datagen", "--preset", "tiny", *bad, "--out", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_check_auc_without_scipy():
    from cctl_rec.datagen.check import auc, average_ranks

    assert average_ranks(np.array([3.0, 1.0, 2.0, 2.0, 5.0, 1.0])).tolist() == [5, 1.5, 3.5, 3.5, 6, 1.5]
    # pairs (pos, neg): 0.9 > 0.1, 0.9 > 0.5, 0.5 > 0.1, 0.5 = 0.5 (half)
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.5, 0.5])) == 3.5 / 4


def test_harm_quality_negates_the_quality_effect_on_harmful_rows_only():
    """logit(harm_quality=1) - logit(harm_quality=0) = -2 * quality * q_i on harmful source rows, 0 elsewhere."""
    from cctl_rec.datagen.generator import Generator, calibrate
    from cctl_rec.datagen.hashing import hash_factors

    out = {}
    for hq in (0.0, 1.0):
        gen = Generator(calibrate(resolve("tiny", knobs={"harm_quality": hq}), rows=1000))
        out[hq] = gen.columns("src", np.random.default_rng(7), 5000, 0, 30 * 86400, with_seq=False)
    a, b = out[0.0], out[1.0]
    assert np.array_equal(a["item_id"], b["item_id"]) and np.array_equal(a["is_harmful"], b["is_harmful"])
    h = a["is_harmful"]
    assert 0 < h.sum() < len(h)
    q = hash_factors(a["item_id"], gen.salt["quality"], 1)[:, 0]
    want = np.where(h, -2.0 * gen.p.knobs["quality"] * q, 0.0)
    np.testing.assert_allclose(b["logit_nobias"] - a["logit_nobias"], want, atol=1e-5)  # float32 logits


def test_harm_knobs_outside_0_1_are_refused():
    with pytest.raises(ValueError, match="harm_quality must be in \\[0, 1\\], got 1.5"):
        resolve("tiny", knobs={"harm_quality": 1.5})
