"""Converters: dedupe, labels, one user id space, seeded per-user split, no leakage into sequences,
other-domain sequences, sampled negatives, one-line errors; the real Amazon files' counts."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cctl_rec.cli import main
from cctl_rec.data.convert.amazon import DEFAULT_SRC, DEFAULT_TGT, convert_amazon
from cctl_rec.data.convert.implicit import convert_implicit

HEADER = "user_id\titem_id\trating\n"


def _write(path, rows, header=HEADER):
    path.write_text((header or "") + "".join("\t".join(str(x) for x in r) + "\n" for r in rows))
    return str(path)


def _split(root, key):
    m = json.loads(open(os.path.join(root, "manifest.json")).read())
    return pa.concat_tables([pq.read_table(os.path.join(root, e["path"])) for e in m["splits"][key]])


def _maps(root):
    users = pq.read_table(os.path.join(root, "maps/users.parquet")).to_pylist()
    items = pq.read_table(os.path.join(root, "maps/items.parquet")).to_pylist()
    return {r["raw_id"]: r["user_id"] for r in users}, {(r["domain"], r["raw_id"]): r["item_id"] for r in items}


def _random_ratings(rng, users, items, n, prefix):
    return [(f"U{rng.integers(users)}", f"{prefix}{rng.integers(items)}", int(rng.integers(1, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def amazon_like(tmp_path_factory):
    """Random ratings, users 0-39 in the target, 20-59 in the source (20 users in both)."""
    d = tmp_path_factory.mktemp("amz")
    rng = np.random.default_rng(1)
    tgt = _random_ratings(rng, 40, 60, 1500, "M")
    src = [(f"U{20 + int(u[1:])}", i, r) for u, i, r in _random_ratings(rng, 40, 30, 900, "B")]
    return _write(d / "src.inter", src), _write(d / "tgt.inter", tgt)


@pytest.fixture(scope="module")
def amazon_out(amazon_like, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("amz_out") / "data")
    convert_amazon(out, src=amazon_like[0], tgt=amazon_like[1], seed=3, max_seq_len=8)
    return out


def test_duplicates_become_one_row_with_the_mean_rating_and_4_is_positive(tmp_path):
    src = _write(tmp_path / "s", [("A", "b1", 5), ("A", "b1", 3), ("B", "b1", 4), ("B", "b1", 3), ("A", "b2", 2)])
    more = [(u, f"x{k}", 5) for u in "AB" for k in range(4)]  # 6 pairs a user: one each in valid, test
    tgt = _write(tmp_path / "t", [("A", "m1", 4.0), ("A", "m1", 4.0), ("A", "m2", 3.0), ("B", "m1", 5), ("B", "m2", 1)]
                 + more)
    m = convert_amazon(str(tmp_path / "out"), src=src, tgt=tgt)
    users, items = _maps(str(tmp_path / "out"))
    s = _split(str(tmp_path / "out"), "src/train").to_pylist()
    got = {(r["user_id"], r["item_id"]): r["label"] for r in s}
    # (A,b1): mean 4 -> 1; (B,b1): mean 3.5 -> 0; (A,b2): 2 -> 0
    assert got == {(users["A"], items["src", "b1"]): 1, (users["B"], items["src", "b1"]): 0,
                   (users["A"], items["src", "b2"]): 0}
    assert m["stats"]["input"]["src"]["duplicate_rows_removed"] == 2
    assert m["stats"]["input"]["tgt"]["duplicate_rows_removed"] == 1
    t = pa.concat_tables([_split(str(tmp_path / "out"), f"tgt/{k}") for k in ("train", "valid", "test")]).to_pylist()
    got = {(r["user_id"], r["item_id"]): r["label"] for r in t}
    assert len(got) == len(t) == 12
    assert got[users["A"], items["tgt", "m1"]] == 1 and got[users["A"], items["tgt", "m2"]] == 0
    assert got[users["B"], items["tgt", "m1"]] == 1 and got[users["B"], items["tgt", "m2"]] == 0


def test_one_user_id_space_and_disjoint_item_ranges(amazon_out):
    users, items = _maps(amazon_out)
    m = json.loads(open(os.path.join(amazon_out, "manifest.json")).read())
    n_tgt, n_src = m["stats"]["items"]["tgt"], m["stats"]["items"]["src"]
    assert m["stats"]["users"] == {"src": 40, "tgt": 40, "both": 20, "id_space": 60}
    assert sorted(users.values()) == list(range(60))
    assert sorted(v for (d, _), v in items.items() if d == "tgt") == list(range(n_tgt))
    assert sorted(v for (d, _), v in items.items() if d == "src") == list(range(n_tgt, n_tgt + n_src))
    for d in ("src", "tgt"):
        card = {f["name"]: f["cardinality"] for f in m["schema"][d]["features"]}
        assert card == {"user_id": 60, "seq": n_tgt + n_src, "item_id": n_tgt + n_src, "context": 1}
    src, tgt = _split(amazon_out, "src/train"), _split(amazon_out, "tgt/train")
    assert max(tgt.column("item_id").to_pylist()) < n_tgt <= min(src.column("item_id").to_pylist())
    # the same raw user has the same id in both domains
    shared = {users[f"U{u}"] for u in range(20, 40)}
    assert shared <= set(src.column("user_id").to_pylist()) and shared <= set(tgt.column("user_id").to_pylist())


def test_split_is_per_user_and_seeded(amazon_like, amazon_out, tmp_path):
    parts = {k: _split(amazon_out, f"tgt/{k}") for k in ("train", "valid", "test")}
    per_user = {}
    for k, t in parts.items():
        for u in t.column("user_id").to_pylist():
            per_user.setdefault(u, {"train": 0, "valid": 0, "test": 0})[k] += 1
    for u, c in per_user.items():
        n = sum(c.values())
        want = int(np.floor(0.1 * n + 0.5))
        assert c["test"] == want and c["valid"] == want and c["train"] == n - 2 * want, (u, c)
    again = str(tmp_path / "again")
    other = str(tmp_path / "other")
    convert_amazon(again, src=amazon_like[0], tgt=amazon_like[1], seed=3, max_seq_len=8)
    convert_amazon(other, src=amazon_like[0], tgt=amazon_like[1], seed=4, max_seq_len=8)
    for root in (amazon_out, again, other):
        assert not [f for f in os.listdir(os.path.join(root, "tgt/test")) if f.startswith(".")]
    files = ["tgt/train/part-00000.parquet", "tgt/valid/part-00000.parquet", "tgt/test/part-00000.parquet",
             "src/train/part-00000.parquet", "maps/users.parquet", "maps/items.parquet"]
    for f in files:  # same seed: the same bytes
        assert open(os.path.join(amazon_out, f), "rb").read() == open(os.path.join(again, f), "rb").read(), f
    test_pairs = {tuple(r.values()) for r in parts["test"].select(["user_id", "item_id"]).to_pylist()}
    other_test = {tuple(r.values()) for r in _split(other, "tgt/test").select(["user_id", "item_id"]).to_pylist()}
    assert test_pairs != other_test and len(test_pairs) == len(other_test)


def _assert_no_leakage(root):
    """No row's seq holds its own item or a valid/test item of its user; sequences hold only the
    user's train positives of their domain; other_seq only train positives of the other domain."""
    t = {k: _split(root, k).to_pylist() for k in ("tgt/train", "tgt/valid", "tgt/test", "src/train")}
    held, pos = {}, {"tgt": {}, "src": {}}
    for k in ("tgt/valid", "tgt/test"):
        for r in t[k]:
            held.setdefault(r["user_id"], set()).add(r["item_id"])
    for k, d in (("tgt/train", "tgt"), ("src/train", "src")):
        for r in t[k]:
            if r["label"] == 1:
                pos[d].setdefault(r["user_id"], set()).add(r["item_id"])
    pairs = [(r["user_id"], r["item_id"]) for k in ("tgt/train", "tgt/valid", "tgt/test") for r in t[k]]
    assert len(pairs) == len(set(pairs))  # a pair is in one split only
    checked = 0
    for k, rows in t.items():
        d, o = ("tgt", "src") if k.startswith("tgt") else ("src", "tgt")
        for r in rows:
            u = r["user_id"]
            assert r["item_id"] not in r["seq"]
            assert not set(r["seq"]) & held.get(u, set()) and not set(r["other_seq"]) & held.get(u, set())
            assert set(r["seq"]) <= pos[d].get(u, set()) and set(r["other_seq"]) <= pos[o].get(u, set())
            assert len(set(r["seq"])) == len(r["seq"])
            checked += len(r["seq"]) + len(r["other_seq"])
    assert checked > 0


def test_no_leakage_into_sequences(amazon_out):
    _assert_no_leakage(amazon_out)


def test_sequence_length_does_not_depend_on_the_label(amazon_out):
    lens = {}
    for k in ("tgt/train", "tgt/valid", "tgt/test"):
        for r in _split(amazon_out, k).to_pylist():
            lens.setdefault(r["user_id"], set()).add(len(r["seq"]))
    assert all(len(v) == 1 for v in lens.values())
    assert max(max(v) for v in lens.values()) == 8  # max_seq_len


def test_other_domain_sequence_iff_user_in_both_domains(amazon_out):
    users, _ = _maps(amazon_out)
    both = {users[f"U{u}"] for u in range(20, 40)}
    for k in ("tgt/train", "tgt/test", "src/train"):
        for r in _split(amazon_out, k).to_pylist():
            assert r["user_in_other"] == (r["user_id"] in both)
            assert (len(r["other_seq"]) > 0) == (r["user_id"] in both)
            assert r["item_in_other"] is False and r["context"] == 0


def test_converted_data_feeds_the_model(amazon_out):
    import torch

    from cctl_rec.config import DataConfig, ModelConfig
    from cctl_rec.data.loader import Dataset, build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.models.cctl import CCTL

    data = Dataset(amazon_out)
    t = next(iter(ParquetStream(data.paths("tgt/train"), data.schemas["tgt"], 32)))
    s = next(iter(ParquetStream(data.paths("src/train"), data.schemas["src"], 16)))
    model = CCTL(data.schemas, ModelConfig(tower=(16,)), device=torch.device("cpu"))
    batch = build_batch(t, s, data.schemas, DataConfig(max_seq_len=20), model.shared)
    out = model(batch)
    assert out.logit_pure.shape == (32,) and out.logit_src.shape == (16,)
    assert torch.isfinite(out.logit_tgt).all() and batch.seq_mask.any()


# ------------------------------------------------------------------------------------ implicit
@pytest.fixture(scope="module")
def implicit_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("impl")
    rng = np.random.default_rng(2)
    for name, n_items, n in (("src", 200, 400), ("tgt", 300, 500)):
        os.makedirs(d / name)
        rows = sorted({(int(rng.integers(30)), int(rng.integers(n_items))) for _ in range(n)})
        test = [r for i, r in enumerate(rows) if i % 7 == 0]
        train = [r for i, r in enumerate(rows) if i % 7] + test[:3]  # 3 pairs in both files
        _write(d / name / "train.txt", [(u, i, 1) for u, i in train], header=None)
        _write(d / name / "test.txt", [(u, i, 1) for u, i in test], header=None)
    return str(d / "src"), str(d / "tgt")


@pytest.fixture(scope="module")
def implicit_out(implicit_dirs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("impl_out") / "data")
    m = convert_implicit(out, implicit_dirs[0], implicit_dirs[1], neg_per_pos=2, seed=5, max_seq_len=6)
    return out, m


def test_negatives_are_never_positives_and_follow_their_positive(implicit_dirs, implicit_out):
    out, m = implicit_out
    users, items = _maps(out)
    for d, splits in (("tgt", ("tgt/train", "tgt/valid", "tgt/test")), ("src", ("src/train",))):
        lines = [ln.split() for f in ("train.txt", "test.txt")
                 for ln in open(os.path.join(implicit_dirs[d == "tgt"], f))]
        positives = {(users[u], items[d, i]) for u, i, _ in lines}
        rows = {k: _split(out, k).to_pylist() for k in splits}
        pairs = [(r["user_id"], r["item_id"]) for k in splits for r in rows[k]]
        assert len(pairs) == len(set(pairs))  # no pair twice, across splits too
        for k in splits:
            per_user = {}
            for r in rows[k]:
                key = (r["user_id"], r["item_id"])
                assert (key in positives) == (r["label"] == 1)
                c = per_user.setdefault(r["user_id"], [0, 0])
                c[r["label"]] += 1
            assert all(neg == 2 * pos for neg, pos in per_user.values())
        assert m["stats"]["negatives"][d] == {"sampled": 2 * len(positives), "short_users": 0}
    _assert_no_leakage(out)


def test_implicit_keeps_their_test_split_and_carves_valid_from_train(implicit_dirs, implicit_out, tmp_path):
    out, m = implicit_out
    users, items = _maps(out)
    tgt_test = [ln.split() for ln in open(os.path.join(implicit_dirs[1], "test.txt"))]
    got = {(r["user_id"], r["item_id"]) for r in _split(out, "tgt/test").to_pylist() if r["label"] == 1}
    assert got == {(users[u], items["tgt", i]) for u, i, _ in tgt_test}
    assert m["stats"]["input"]["tgt"]["train_pairs_dropped_in_test"] == 3
    assert m["stats"]["rows"]["tgt/valid"] > 0 and m["stats"]["splits"]["tgt/test"]["ctr"] == pytest.approx(1 / 3)
    again = str(tmp_path / "again")
    convert_implicit(again, implicit_dirs[0], implicit_dirs[1], neg_per_pos=2, seed=5, max_seq_len=6)
    m2 = json.loads(open(os.path.join(again, "manifest.json")).read())
    assert m2["splits"] == m["splits"]  # same seed: same shards (sha256)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("content, expect", [
    ("", "is empty"),
    ("user\titem\trating\nA\tb\t5\n", "header 'user\\titem\\trating', expected the columns user_id item_id rating"),
    (HEADER + "A\tb\t5\nA\tc\n", "line 3: 2 column(s) in 'A\\tc', expected 3 (user item rating [timestamp])"),
    (HEADER + "A\tb\tfive\n", "line 2: rating 'five' is not a number"),
    (HEADER + "A\tb\t7\n", "line 2: rating 7 is outside [1, 5]"),
    (HEADER, "has a header but no rows"),
])
def test_bad_amazon_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.inter"
    bad.write_text(content)
    good = _write(tmp_path / "good.inter", [("A", "m", 5)])
    out = tmp_path / "out"
    assert main(["convert", "amazon", "--src", str(bad), "--tgt", good, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and expect in err[0], err
    assert not out.exists()


def test_no_held_out_rows_is_one_line_and_writes_nothing(tmp_path, capsys):
    src = _write(tmp_path / "s", [("A", "b", 5)])
    tgt = _write(tmp_path / "t", [("A", f"m{k}", 5) for k in range(4)])  # 4 pairs: all stay in train
    out = tmp_path / "out"
    assert main(["convert", "amazon", "--src", src, "--tgt", tgt, "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if " INFO " not in ln]  # logging
    assert len(err) == 1 and "would have no tgt/valid rows" in err[0]
    assert not out.exists()


def test_missing_inputs_are_one_line(tmp_path, capsys, implicit_dirs):
    out = tmp_path / "out"
    good = _write(tmp_path / "good.inter", [("A", "m", 5)])
    assert main(["convert", "amazon", "--src", str(tmp_path / "nope.inter"), "--tgt", good, "--out", str(out)]) == 2
    assert f"--src file {tmp_path / 'nope.inter'} does not exist" in capsys.readouterr().err
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "train.txt").write_text("1\t2\t1\n")
    assert main(["convert", "implicit", "--src-dir", implicit_dirs[0], "--tgt-dir", str(lonely),
                 "--out", str(out)]) == 2
    assert f"--tgt-dir {lonely} has no test.txt" in capsys.readouterr().err
    (lonely / "test.txt").write_text("1\t2\n")
    assert main(["convert", "implicit", "--src-dir", implicit_dirs[0], "--tgt-dir", str(lonely),
                 "--out", str(out)]) == 2
    assert "line 1: 2 column(s) in '1\\t2', expected 3 (user item value [timestamp])" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_another_dataset(tmp_path, capsys, amazon_like):
    from tests.tinydata import write_tiny

    out = tmp_path / "out"
    write_tiny(str(out), n_tgt=256, n_src=512, files=1)   # a real (synthetic) dataset, preset 'test'
    before = (out / "manifest.json").read_bytes()
    assert main(["convert", "amazon", "--src", amazon_like[0], "--tgt", amazon_like[1], "--out", str(out)]) == 2
    assert "holds another dataset (preset 'test')" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


# ------------------------------------------------------------------------------------ real data
@pytest.mark.skipif(not (os.path.exists(DEFAULT_SRC) and os.path.exists(DEFAULT_TGT)),
                    reason="shared/datasets/amazon-books-movies not present")
def test_real_amazon_counts_match_the_measured_numbers(tmp_path):
    """shared/datasets/README.md: Books 38,149 rows, 1,426 users, 723 items; Movies 68,023 rows,
    1,381 users, 1,338 items; 1,329 users in both; rating >= 4 on 82.8% / 72.9% of the rows;
    about 6.6k / 5.9k duplicate (user, item) rows."""
    m = convert_amazon(str(tmp_path / "amazon"), seed=0)
    st = m["stats"]
    src, tgt = st["input"]["src"], st["input"]["tgt"]
    assert (src["rows"], src["users"], src["items"]) == (38_149, 1_426, 723)
    assert (tgt["rows"], tgt["users"], tgt["items"]) == (68_023, 1_381, 1_338)
    assert round(src["positive_share"], 3) == 0.828 and round(tgt["positive_share"], 3) == 0.729
    assert abs(src["duplicate_rows_removed"] - 6_600) < 100 and abs(tgt["duplicate_rows_removed"] - 5_900) < 100
    assert st["rows"]["src/train"] == src["rows"] - src["duplicate_rows_removed"]
    assert sum(st["rows"][f"tgt/{k}"] for k in ("train", "valid", "test")) == tgt["rows"] - tgt["duplicate_rows_removed"]
    assert st["users"] == {"src": 1_426, "tgt": 1_381, "both": 1_329, "id_space": 1_478}
    assert st["items"] == {"src": 723, "tgt": 1_338, "id_space": 2_061}
    assert st["splits"]["tgt/train"]["users"] == 1_381 and st["leakage_check"] == "passed"


def test_shared_id_tables_train_on_converted_data(amazon_out, tmp_path):
    """Issue 16: ``model.share_ids=true ren.enabled=false`` crashed at step 0 on converted data
    ("need at least one array to concatenate"): the converted schemas are the same in both
    domains, so every source feature is looked up in the target tables and the source KJT has
    no key. It trains, and the source rows are scored at the end."""
    run = tmp_path / "run"
    assert main(["train", "--data", amazon_out, "--run-dir", str(run), "data.batch_size=64", "data.src_ratio=1",
                 "model.tower=[16]", "model.san_hidden=[8]", "model.share_ids=true", "ren.enabled=false",
                 "run.steps=3", "run.threads=1", "run.log_every=3", "scn.sync_every=2",
                 "selector.update_every=2"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 3 and m["selector"]["rows"] > 0 and 0.0 < m["target_test"]["auc"] < 1.0
    assert "src" not in json.loads((run / "plan.json").read_text())  # no source table left to shard


# ------------------------------------------------------------------------- sparsity, cold users, harm
KEEP = ["user_id", "item_id", "context", "label", "other_seq", "user_in_other", "item_in_other"]
"""The target valid/test columns a sparse conversion leaves as the dense one's (``seq`` is drawn
from the kept train positives only, ``user_group`` follows the thinned counts)."""


def _amazon(amazon_like, root, **kw):
    from cctl_rec.data.convert.common import Corruption, Sparsity

    sp = {k: kw.pop(k) for k in ("keep_frac", "cold_user_frac", "cold_k") if k in kw}
    c = {k: kw.pop(k) for k in ("frac", "mode") if k in kw}
    kw = {"seed": 3, "max_seq_len": 8, **kw}
    return convert_amazon(str(root), src=amazon_like[0], tgt=amazon_like[1],
                          sparsity=Sparsity(**sp) if sp else None, corruption=Corruption(**c) if c else None, **kw)


def _pairs(t):
    return list(zip(t.column("user_id").to_pylist(), t.column("item_id").to_pylist()))


def _per_user(t):
    out = {}
    for u in t.column("user_id").to_pylist():
        out[u] = out.get(u, 0) + 1
    return out


def test_keep_frac_one_is_the_dense_conversion_byte_for_byte(amazon_like, amazon_out, tmp_path):
    _amazon(amazon_like, tmp_path / "one", keep_frac=1.0)
    for f in ("tgt/train", "tgt/valid", "tgt/test", "src/train"):
        f = f"{f}/part-00000.parquet"
        assert open(os.path.join(amazon_out, f), "rb").read() == (tmp_path / "one" / f).read_bytes(), f


def test_sparse_target_thins_train_only_and_sequences_come_from_the_kept_rows(amazon_like, amazon_out, tmp_path):
    m = _amazon(amazon_like, tmp_path / "s30", keep_frac=0.3)
    sparse = str(tmp_path / "s30")
    for k in ("tgt/valid", "tgt/test"):  # the evaluation rows (and their order) are the dense ones
        assert _split(sparse, k).select(KEEP).equals(_split(amazon_out, k).select(KEEP)), k
    dense_n, kept_n = _per_user(_split(amazon_out, "tgt/train")), _per_user(_split(sparse, "tgt/train"))
    assert kept_n == {u: max(1, int(np.floor(0.3 * n + 0.5))) for u, n in dense_n.items()}
    assert set(_pairs(_split(sparse, "tgt/train"))) <= set(_pairs(_split(amazon_out, "tgt/train")))
    _assert_no_leakage(sparse)  # every seq / other_seq item is a train positive of the SPARSE data
    st = m["stats"]["target_sparsity"]
    assert st["train_units_dense"] == sum(dense_n.values()) and st["train_units_kept"] == sum(kept_n.values())
    assert m["params"]["target_sparsity"]["tgt_keep_frac"] == 0.3
    # a smaller share keeps a subset of a larger one's rows (one seeded order per user)
    _amazon(amazon_like, tmp_path / "s10", keep_frac=0.1)
    assert set(_pairs(_split(str(tmp_path / "s10"), "tgt/train"))) <= set(_pairs(_split(sparse, "tgt/train")))
    # the source rows are the dense ones; only their other_seq (target train positives) thins
    a, b = _split(sparse, "src/train"), _split(amazon_out, "src/train")
    assert a.drop_columns(["other_seq"]).equals(b.drop_columns(["other_seq"]))


def test_user_group_marks_users_with_few_train_rows(amazon_like, tmp_path):
    m = _amazon(amazon_like, tmp_path / "g", keep_frac=0.2, cold_k=3)
    root = str(tmp_path / "g")
    n = _per_user(_split(root, "tgt/train"))
    for k in ("tgt/train", "tgt/valid", "tgt/test"):
        t = _split(root, k)
        assert t.schema.field("user_group").type == pa.int8()
        for u, g in zip(t.column("user_id").to_pylist(), t.column("user_group").to_pylist()):
            assert g == int(n.get(u, 0) <= 3)
    g = m["stats"]["user_groups"]
    assert g["cold_users"] == sum(c <= 3 for c in n.values()) and g["cold_users"] + g["warm_users"] == 40
    test = _split(root, "tgt/test")
    assert g["tgt/test"]["cold"]["rows"] == sum(test.column("user_group").to_pylist())
    assert g["tgt/test"]["cold"]["rows"] + g["tgt/test"]["warm"]["rows"] == test.num_rows
    assert "at most 3" in g["rule"] and "at most 3" in m["params"]["target_sparsity"]["user_group_rule"]


def test_cold_start_users_keep_k_train_rows_and_form_the_cold_group(amazon_like, amazon_out, tmp_path):
    m = _amazon(amazon_like, tmp_path / "c", cold_user_frac=0.25, cold_k=2)
    root = str(tmp_path / "c")
    dense_n, n = _per_user(_split(amazon_out, "tgt/train")), _per_user(_split(root, "tgt/train"))
    cold = {u for u, k in n.items() if k < dense_n[u]}
    assert len(cold) == 10 and m["stats"]["target_sparsity"]["cold_start_users"] == 10  # round(0.25 * 40)
    assert all(n[u] == min(2, dense_n[u]) for u in cold) and all(n[u] == dense_n[u] for u in n if u not in cold)
    for k in ("tgt/valid", "tgt/test"):
        t = _split(root, k)
        assert t.select(KEEP).equals(_split(amazon_out, k).select(KEEP))
        got = dict(zip(t.column("user_id").to_pylist(), t.column("user_group").to_pylist()))
        assert {u for u, g in got.items() if g == 1} == cold & set(got)
    assert m["stats"]["user_groups"]["cold_users"] == 10 and "cold-start" in m["stats"]["user_groups"]["rule"]
    _assert_no_leakage(root)
    other = _amazon(amazon_like, tmp_path / "c2", cold_user_frac=0.25, cold_k=2, seed=4)
    assert other["stats"]["target_sparsity"]["cold_start_users"] == 10


def test_sparse_implicit_keeps_the_dense_negatives_of_valid_and_test(implicit_dirs, implicit_out, tmp_path):
    from cctl_rec.data.convert.common import Sparsity

    out, _ = implicit_out
    sparse = str(tmp_path / "s")
    m = convert_implicit(sparse, implicit_dirs[0], implicit_dirs[1], neg_per_pos=2, seed=5, max_seq_len=6,
                         sparsity=Sparsity(keep_frac=0.3))
    for k in ("tgt/valid", "tgt/test"):
        assert _split(sparse, k).select(KEEP).equals(_split(out, k).select(KEEP)), k
    t = _split(sparse, "tgt/train").to_pylist()
    per_user = {}
    for r in t:
        per_user.setdefault(r["user_id"], [0, 0])[r["label"]] += 1
    dense = {}
    for r in _split(out, "tgt/train").to_pylist():
        dense.setdefault(r["user_id"], [0, 0])[r["label"]] += 1
    for u, (neg, pos) in per_user.items():  # a kept positive keeps its 2 negatives
        assert pos == max(1, int(np.floor(0.3 * dense[u][1] + 0.5))) and neg == 2 * pos
    assert set(_pairs(_split(sparse, "tgt/train"))) <= set(_pairs(_split(out, "tgt/train")))
    negs = sum(int((_split(sparse, k).column("label").to_numpy() == 0).sum()) for k in ("tgt/train", "tgt/valid",
                                                                                       "tgt/test"))
    assert m["stats"]["target_sparsity"]["sampled_negatives_kept"] == negs
    _assert_no_leakage(sparse)


@pytest.mark.parametrize("mode", ["label", "item"])
def test_corrupted_source_rows_are_marked_and_sequences_stay_clean(amazon_like, amazon_out, tmp_path, mode):
    m = _amazon(amazon_like, tmp_path / mode, frac=0.3, mode=mode)
    root = str(tmp_path / mode)
    for f in ("tgt/train", "tgt/valid", "tgt/test"):  # the target files do not change at all
        f = f"{f}/part-00000.parquet"
        assert open(os.path.join(amazon_out, f), "rb").read() == open(os.path.join(root, f), "rb").read(), f
    bad, clean = _split(root, "src/train"), _split(amazon_out, "src/train")
    assert bad.schema.field("is_harmful").type == pa.bool_() and not bad.schema.field("is_harmful").nullable
    h = np.array(bad.column("is_harmful").to_pylist())
    assert h.sum() == int(np.floor(0.3 * bad.num_rows + 0.5)) == m["stats"]["corruption"]["rows"]
    for col in ("user_id", "seq", "other_seq", "context", "user_in_other"):  # drawn before the corruption
        assert bad.column(col).equals(clean.column(col)), col
    y, y0 = np.array(bad.column("label").to_pylist()), np.array(clean.column("label").to_pylist())
    i, i0 = np.array(bad.column("item_id").to_pylist()), np.array(clean.column("item_id").to_pylist())
    if mode == "label":
        assert (y[h] == 1 - y0[h]).all() and (y[~h] == y0[~h]).all() and (i == i0).all()
    else:
        lo = m["stats"]["items"]["tgt"]
        assert (i[h] != i0[h]).all() and (i[~h] == i0[~h]).all() and (y == y0).all()
        assert lo <= i.min() and i.max() < lo + m["stats"]["items"]["src"]
    assert m["params"]["corruption"] == {"frac": 0.3, "mode": mode, "rule": m["stats"]["corruption"]["rule"]}
    assert "is_harmful" not in _split(amazon_out, "src/train").column_names  # none asked: no column


def test_corrupted_data_feeds_the_oracle_and_the_grouped_metrics(amazon_like, tmp_path):
    """The converted ``is_harmful`` is read as the synthetic one: the oracle selector trains on it,
    the harmful AUROC is measured; ``metrics.json`` splits the target AUC by user group."""
    from cctl_rec.data.loader import Dataset

    root = tmp_path / "data"
    m = _amazon(amazon_like, root, keep_frac=0.5, cold_user_frac=0.3, cold_k=2, frac=0.3, mode="label")
    assert Dataset(str(root)).has_harmful
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--run-dir", str(run), "data.batch_size=64", "data.src_ratio=1",
                 "model.tower=[16]", "model.san_hidden=[8]", "selector.mode=oracle", "run.steps=4",
                 "run.threads=1", "run.log_every=4", "scn.sync_every=2"]) == 0
    r = json.loads((run / "metrics.json").read_text())
    assert r["selector"]["harmful_auc"] is not None and r["selector"]["p_harmful"] is not None
    for split in ("test", "valid"):
        g = r[f"target_{split}_groups"]
        want = m["stats"]["user_groups"][f"tgt/{split}"]
        assert set(g) == {"cold", "warm"}
        assert {k: g[k]["rows"] for k in g} == {k: want[k]["rows"] for k in want}
        for k in g:
            if g[k]["rows"]:
                assert g[k]["logloss"] > 0 and (g[k]["auc"] is None or 0.0 <= g[k]["auc"] <= 1.0)
            else:
                assert g[k]["logloss"] is None and g[k]["auc"] is None
        assert g["cold"]["rows"] > 0 and g["warm"]["rows"] > 0


# ------------------------------------------------------------------------------ files as they are
def test_headerless_comma_and_timestamp_files_read_as_the_header_tsv(amazon_like, amazon_out, tmp_path):
    """Amazon's ratings_*.csv: 'user,item,rating,timestamp', no header. The timestamp is checked
    and ignored: the dataset is the one of the header TSV."""
    for name, fmt in (("csv", lambda r, t: f"{r[0]},{r[1]},{r[2]},{t}\n"),
                      ("tsv4", lambda r, t: f"{r[0]}\t{r[1]}\t{r[2]}\t{t}\n"),
                      ("bare", lambda r, t: f"{r[0]} {r[1]} {r[2]}\n")):
        files = []
        for k, path in enumerate(amazon_like):
            rows = [ln.split("\t") for ln in open(path).read().splitlines()[1:]]
            p = tmp_path / f"{name}{k}"
            p.write_text("".join(fmt(r, 1_400_000_000 + j) for j, r in enumerate(rows)))
            files.append(str(p))
        m = _amazon(files, tmp_path / f"out-{name}")
        for f in ("tgt/train", "tgt/valid", "tgt/test", "src/train"):
            f = f"{f}/part-00000.parquet"
            assert open(os.path.join(amazon_out, f), "rb").read() == (tmp_path / f"out-{name}" / f).read_bytes()
        assert m["stats"]["input"]["tgt"]["header"] is False
        assert m["stats"]["input"]["tgt"]["timestamp_column"] is (name != "bare")
    hdr = tmp_path / "hdr"
    hdr.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nA\tm1\t5\t12\n")
    from cctl_rec.data.convert.common import read_triples

    t = read_triples(str(hdr), ("user_id", "item_id", "rating"), "rating", "--tgt")
    assert t.header and t.timestamps and t.values.tolist() == [5.0]


@pytest.mark.parametrize("content, expect", [
    ("user_id\titem_id\trating\ttimestamp\nA\tb\t5\t100\nA\tc\t4\n",
     "line 3: 3 column(s) in 'A\\tc\\t4', expected 4 (user item rating [timestamp]) like line 2"),
    ("A,b,5,100\nA,c,4\n", "line 2: 3 column(s) in 'A,c,4', expected 4 (user item rating [timestamp]) like line 1"),
    ("A\tb\t5\tyesterday\n", "line 1: timestamp 'yesterday' is not a number (a 4th column is read as a timestamp)"),
    ("A\tb\t5\t1\t2\n", "line 1: 5 column(s)"),
])
def test_bad_rows_of_files_as_they_are_are_one_line(tmp_path, capsys, content, expect):
    bad = tmp_path / "bad.inter"
    bad.write_text(content)
    good = _write(tmp_path / "good.inter", [("A", "m", 5)])
    assert main(["convert", "amazon", "--src", str(bad), "--tgt", good, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "out").exists()


def test_implicit_header_line_is_refused_with_how_to_drop_it(tmp_path, capsys, implicit_dirs):
    d = tmp_path / "t"
    d.mkdir()
    (d / "train.txt").write_text("user\titem\tvalue\n1\t2\t1\n")
    (d / "test.txt").write_text("1\t3\t1\n")
    assert main(["convert", "implicit", "--src-dir", implicit_dirs[0], "--tgt-dir", str(d),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "if line 1 is a header, remove it" in err[0] and "tail -n +2" in err[0]


def test_neg_per_pos_0_needs_both_labels_in_the_files(implicit_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "implicit", "--src-dir", implicit_dirs[0], "--tgt-dir", implicit_dirs[1],
                 "--neg-per-pos", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--neg-per-pos 0 samples no negatives" in err[0] and "--neg-per-pos N >= 1" in err[0]
    assert not out.exists()
    rng = np.random.default_rng(0)  # a rating file: --min-positive 4 gives the negatives
    rated = tmp_path / "rated"
    rated.mkdir()
    for f, n in (("train.txt", 600), ("test.txt", 60)):
        rows = {(int(rng.integers(30)), int(rng.integers(100))): int(rng.integers(1, 6)) for _ in range(n)}
        _write(rated / f, [(u, i, v) for (u, i), v in rows.items()], header=None)
    m = convert_implicit(str(out), implicit_dirs[0], str(rated), neg_per_pos=0, min_positive=4)
    assert m["stats"]["negatives"]["tgt"]["sampled"] == 0
    assert 0 < m["stats"]["splits"]["tgt/test"]["ctr"] < 1


@pytest.mark.parametrize("args, expect", [
    (["--tgt-keep-frac", "0"], "--tgt-keep-frac must be in (0, 1], got 0.0"),
    (["--cold-user-frac", "1.5"], "--cold-user-frac must be in [0, 1], got 1.5"),
    (["--cold-k", "-1"], "--cold-k must be an integer >= 0, got -1"),
    (["--corrupt-frac", "-0.1"], "--corrupt-frac must be in [0, 1], got -0.1"),
])
def test_bad_sparsity_and_harm_options_are_one_line(amazon_like, tmp_path, capsys, args, expect):
    assert main(["convert", "amazon", "--src", amazon_like[0], "--tgt", amazon_like[1],
                 "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["amazon", "implicit"])
def test_help_documents_every_option(source, capsys):
    with pytest.raises(SystemExit):
        main(["convert", source, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for opt in ("--tgt-keep-frac", "--cold-user-frac", "--cold-k", "--corrupt-frac", "--corrupt-mode", "--seed",
                "--max-seq-len", "--shard-rows", "timestamp"):
        assert opt in out, opt
    if source == "implicit":
        assert "0: none, the labels come from the values alone" in out
    else:
        assert "without the header" in out
