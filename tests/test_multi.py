"""Multi-valued id features, per-feature pooling and per-feature embedding widths (issue #19): a
``kind: id_list`` column other than ``seq`` (EasyRec's TagFeature: a list of ids per row) mapped by
``cctl-rec prepare``, pooled (sum or mean, per feature) in its table's EmbeddingBag of its own width
(``dim``), trained, sharded, exported and served from raw Parquet; ``seq``'s pooling (its item
table's) may be sum too."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cctl_rec.cli import main
from tests.test_features import _write  # (dir, text, name) -> path

SPLITS = {"tgt/train": 4000, "tgt/valid": 1000, "tgt/test": 1000, "src/train": 4000}
TAGS = np.array([f"t{j}" for j in range(12)])
GOOD = {"t0", "t1", "t2"}

FEATURES = """
spaces: [{name: user, vocab: {}}, {name: item, vocab: {}}, {name: tag, vocab: {}}, {name: cat, hash: {buckets: 8}}]
domains:
  tgt:
    label: {column: y}
    features:
      - {name: user_id, column: u, space: user, token: user}
      - {name: tags, kind: id_list, space: tag, token: user, pooling: sum, dim: 16}
      - {name: seq, column: hist, kind: id_list, space: item, pooling: sum}
      - {name: item_id, column: i, space: item, token: item}
  src:
    label: {column: y}
    features:
      - {name: user_id, column: u, space: user, token: user}
      - {name: tags, kind: id_list, space: tag, token: user, pooling: sum, dim: 16}
      - {name: seq, column: hist, kind: id_list, space: item}
      - {name: item_id, column: i, space: item, token: item}
      - {name: cats, kind: id_list, space: cat, token: item, dim: 4}
"""
"""Both domains' ``tags`` (string tags, sum-pooled, 16 wide) are one attribute the mixed network
shares; the source's ``cats`` (int ids hashed into 8 buckets, mean-pooled, 4 wide) is a table of its
own; the target's ``seq`` is sum-pooled (its item table's pooling), the source's mean-pooled; every
other table is model.embedding_dim (8) wide."""

SMALL = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.log_every=20",
         "scn.sync_every=10", "selector.update_every=5"]


def _lists(rng, n: int, values: np.ndarray, most: int, null_share: float = 0.03) -> pa.Array:
    """n lists of 0..most values, ~3% null lists and ~2% null values inside the lists."""
    out = []
    for k in rng.integers(0, most + 1, n):
        x = values[rng.integers(0, len(values), k)].tolist()
        out.append(None if rng.random() < null_share else [None if rng.random() < 0.02 else v for v in x])
    return pa.array(out)


def write_raw(out: str, seed: int = 0) -> str:
    """Raw logs: int ids ``u`` / ``i`` (50 each), ``tags`` list<string> (0-4 of 12 tags), ``hist``
    list<int64> (0-5 items), ``cats`` list<int64> (0-3 raw ints) and ``y`` ~ Bernoulli(sigmoid(2 g - 1.5)),
    g the number of the row's tags in t0..t2: the label is in the tags."""
    rng = np.random.default_rng(seed)
    for split, n in SPLITS.items():
        tags = _lists(rng, n, TAGS, 4)
        good = np.array([sum(t in GOOD for t in (x or ()) if t is not None) for x in tags.to_pylist()])
        y = (rng.random(n) < 1 / (1 + np.exp(-(2.0 * good - 1.5)))).astype(np.int8)
        t = {"u": pa.array(rng.integers(0, 50, n)), "i": pa.array(rng.integers(0, 50, n)), "tags": tags,
             "hist": _lists(rng, n, np.arange(50), 5, 0.0), "y": pa.array(y)}
        if split.startswith("src"):
            t["cats"] = _lists(rng, n, np.array([7, 70, 700, 7000, 70000]), 3, 0.0)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        pq.write_table(pa.table(t), os.path.join(out, split, "part-0.parquet"))
    return out


@pytest.fixture(scope="module")
def multi_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    raw = write_raw(str(d / "raw"))
    out = str(d / "data")
    assert main(["prepare", "--features", _write(d, FEATURES, "f.yaml"), "--data", raw, "--out", out]) == 0
    return raw, out


# ------------------------------------------------------------------------------- by hand
HAND = """
spaces: [{name: user, vocab: {}}, {name: item, vocab: {}}, {name: tag, vocab: {min_count: 2}}]
domains:
  tgt:
    label: {column: y}
    features:
      - {name: user_id, column: u, space: user, token: user}
      - {name: tags, kind: id_list, space: tag, token: user, pooling: sum}
      - {name: item_id, column: i, space: item, token: item}
  src:
    label: {column: y}
    features:
      - {name: user_id, column: u, space: user, token: user}
      - {name: tags, kind: id_list, space: tag, token: item}
      - {name: item_id, column: i, space: item, token: item}
"""


def test_a_multi_valued_feature_is_mapped_and_pooled_as_configured(tmp_path):
    """Train tags (both domains) a x 4, b x 3, c and zz once; min_count 2 -> rows a 1, b 2 (most
    frequent first), c and zz the OOV row 0. A null list is empty; a null, rare or unseen tag is row
    0 and counts in the mean. With table row r = (r, 10 r): the target's sum of [a, b] is (3, 30);
    the source's mean of [b, null, zz] is (2/3, 20/3)."""
    from cctl_rec.config import DataConfig
    from cctl_rec.data.loader import Dataset, build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.modules.embedding import build_ebc

    rows = {"tgt/train": [["a", "b"], ["a"], [], None], "tgt/valid": [["c"], ["zz", "a"]],
            "tgt/test": [["b"], None], "src/train": [["b", None, "zz"], ["a", "a"], ["c"], ["b"]]}
    for split, tags in rows.items():
        n = len(tags)
        (tmp_path / "raw" / split).mkdir(parents=True)
        pq.write_table(pa.table({"u": pa.array(np.arange(n)), "i": pa.array(np.arange(n)),
                                 "tags": pa.array(tags, pa.list_(pa.string())), "y": pa.array([0, 1] * (n // 2))}),
                       str(tmp_path / "raw" / split / "part-0.parquet"))
    out = str(tmp_path / "data")
    assert main(["prepare", "--features", _write(tmp_path, HAND, "f.yaml"), "--data", str(tmp_path / "raw"),
                 "--out", out]) == 0
    want = {"tgt/train": [[1, 2], [1], [], []], "tgt/valid": [[0], [0, 1]], "tgt/test": [[2], []],
            "src/train": [[2, 0, 0], [1, 1], [0], [2]]}
    for split, w in want.items():
        assert pq.read_table(os.path.join(out, split)).column("tags").to_pylist() == w, split
    ds = Dataset(out)
    ts, ss = ds.schemas["tgt"], ds.schemas["src"]
    assert (ts.feature("tags").multi, ts.feature("tags").pooling, ts.feature("tags").cardinality) == (True, "sum", 3)
    assert (ss.feature("tags").multi, ss.feature("tags").pooling) == (True, "mean")
    assert ts.multi_features == ["tags"] and ts.token_features("user") == ["t_user_id", "t_tags", "t_seq"]
    assert ss.token_features("item") == ["s_tags", "s_item_id"]
    t = next(iter(ParquetStream(ds.paths("tgt/train"), ts, 4)))
    s = next(iter(ParquetStream(ds.paths("src/train"), ss, 4)))
    batch = build_batch(t, s, ds.schemas, DataConfig(batch_size=4))
    for schema, kjt, expect in ((ts, batch.tgt, [[3, 30], [1, 10], [0, 0], [0, 0]]),
                                (ss, batch.src, [[2 / 3, 20 / 3], [1, 10], [0, 0], [2, 20]])):
        ebc = build_ebc(schema, 2, torch.device("cpu"))
        with torch.no_grad():
            for p in ebc.parameters():
                p.copy_(torch.arange(p.shape[0], dtype=torch.float32).view(-1, 1) * torch.tensor([1.0, 10.0]))
            got = ebc(kjt).to_dict()[schema.prefix + "tags"][:4]
        torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float32))


# ------------------------------------------------------------------------------- widths
def test_each_table_has_its_features_width_and_a_token_the_sum(multi_data):
    """model.embedding_dim 8; tags 16, cats 4. Target tokens: user = user_id 8 + tags 16 + seq 8 = 32,
    item = item_id 8, context 8; source: user 32, item = cats 4 + item_id 8 = 12, context 8. SAN maps
    the source item token 12 -> 8 and passes the user and context tokens (same features) through."""
    from cctl_rec.config import DataConfig, ModelConfig
    from cctl_rec.data.loader import Dataset, build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.schema import TOKENS

    _, data = multi_data
    ds = Dataset(data)
    ts, ss = ds.schemas["tgt"], ds.schemas["src"]
    assert {t: ts.token_width(t, 8) for t in TOKENS} == {"user": 32, "item": 8, "context": 8}
    assert {t: ss.token_width(t, 8) for t in TOKENS} == {"user": 32, "item": 12, "context": 8}
    torch.manual_seed(0)
    model = CCTL(ds.schemas, ModelConfig(tower=(16, 8), san_hidden=(8,)), device=torch.device("cpu"))
    assert model.shared == ("tags", "context")  # the constant context too
    assert {c.name: c.embedding_dim for c in model.mixed_tgt.embedding_bag_configs()} == \
        {"t_user_id": 8, "t_tags": 16, "t_item_id": 8, "t_context": 8}
    assert {c.name: c.embedding_dim for c in model.src.embedding_bag_configs()} == \
        {"s_user_id": 8, "s_item_id": 8, "s_cats": 4}
    assert {t for t, m in model.san.maps.items() if isinstance(m, torch.nn.Identity)} == {"user", "context"}
    assert next(m for m in model.san.maps["item"].modules() if isinstance(m, torch.nn.Linear)).in_features == 12
    t = next(iter(ParquetStream(ds.paths("tgt/train"), ts, 32)))
    s = next(iter(ParquetStream(ds.paths("src/train"), ss, 64)))
    out = model(build_batch(t, s, ds.schemas, DataConfig(batch_size=32, src_ratio=2), model.shared))
    assert out.x_tgt.shape == (32, 48) and out.x_src.shape == (64, 48) and out.ren_id_s.shape == (64, 8)


def test_a_field_head_refuses_features_of_another_width(multi_data, tmp_path, capsys):
    _, data = multi_data
    rc = main(["train", "--data", data, "--run-dir", str(tmp_path / "run"), "model.head=deepfm", *SMALL])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[rank")]
    assert rc == 2 and len(err) == 1, err
    assert ("model.head=deepfm reads the tower input as fields of width model.embedding_dim=8 but the dataset gives "
            "features other widths (tgt.tags=16, src.tags=16, src.cats=4)") in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


# ------------------------------------------------------------------------------- bad input
BAD = [
    ("pooling on a single id", ("{name: item_id, column: i, space: item, token: item}\n  src",
                                "{name: item_id, column: i, space: item, token: item, pooling: sum}\n  src"),
     None, "feature 'item_id': pooling sum on a kind id feature: only a list of ids (kind id_list) is pooled"),
    ("two poolings of one table", ("{name: seq, column: hist, kind: id_list, space: item}",
                                   "{name: seq, column: hist, kind: id_list, space: item}\n      - "
                                   "{name: hist2, column: hist, kind: id_list, space: item, token: user, pooling: sum}"),
     None, "domains.src.features: 'seq' (pooling mean) and 'hist2' (pooling sum) use space 'item', one table"),
    ("REN pair of two widths", ("{name: user_id, column: u, space: user, token: user}\n      - {name: tags",
                                "{name: user_id, column: u, space: user, token: user, dim: 12}\n      - {name: tags"),
     None, "REN pairs user_id and item_id (and seq, in the item table) across the domains and needs one width"),
    ("two dims of one table", ("{name: seq, column: hist, kind: id_list, space: item}",
                               "{name: seq, column: hist, kind: id_list, space: item, dim: 4}\n      - "
                               "{name: hist2, column: hist, kind: id_list, space: item, token: user, dim: 8}"),
     None, "domains.src.features: 'seq' (dim 4) and 'hist2' (dim 8) use space 'item', one table"),
    ("a dim that is not a multiple of 4", ("cat, token: item, dim: 4}", "cat, token: item, dim: 5}"),
     None, "feature 'cats': dim 5: expected a multiple of 4 in [4, 65536]"),
    ("a list feature that is not a list", None, "src/train",
     "column 'cats' (domains.src.features 'cats') has type int64; expected a list of int or string ids"),
]


@pytest.mark.parametrize("case, edit, split, msg", BAD, ids=[b[0].replace(" ", "-") for b in BAD])
def test_bad_multi_valued_config_or_column_is_one_line_exit_2(tmp_path, capsys, case, edit, split, msg):
    raw = write_raw(str(tmp_path / "raw"))
    if split:
        path = os.path.join(raw, split, "part-0.parquet")
        t = pq.read_table(path)
        pq.write_table(t.set_column(t.column_names.index("cats"), "cats", pa.array(np.arange(t.num_rows))), path)
    text = FEATURES.replace(*edit) if edit else FEATURES
    assert text != FEATURES or split
    out = tmp_path / "out"
    rc = main(["prepare", "--features", _write(tmp_path, text, "f.yaml"), "--data", raw, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and msg in err, (case, err)
    assert not out.exists()


# ------------------------------------------------------------------------ train, export, serve
@pytest.mark.slow  # trains, exports and predicts: ~30 s on one loaded core
def test_export_and_predict_on_raw_parquet_give_the_training_logits(multi_data, tmp_path, capsys):
    """Raw tags / cats / hist in: predict's logits == the trained model's on the prepared rows
    (run.save_predictions) within 1e-5; the program gives the same; other tags, other logits."""
    from cctl_rec.export import load_artifact, serving_inputs

    raw, data = multi_data
    run, model = tmp_path / "run", tmp_path / "model"
    assert main(["train", "--data", data, "--run-dir", str(run), *SMALL, "run.save_predictions=true"]) == 0
    assert main(["export", "--run-dir", str(run), "--out", str(model)]) == 0
    meta = json.loads((model / "serving.json").read_text())
    assert meta["inputs"] == ["ids", "seq", "seq_len", "bags", "bag_len"]
    assert meta["single_features"] == ["user_id", "item_id", "context"]
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--data", os.path.join(raw, "tgt/test"),
                 "--out", str(tmp_path / "p.parquet")]) == 0
    got = pq.read_table(tmp_path / "p.parquet").column("logit").to_numpy()
    want = pq.read_table(run / "predictions-tgt-test.parquet").column("logit").to_numpy()
    assert got.size == SPLITS["tgt/test"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    net, _ = load_artifact(str(model))
    rows = pq.read_table(os.path.join(data, "tgt/test")).slice(0, 64)
    inputs = serving_inputs(net, rows, int(meta["max_seq_len"]), "rows")
    assert inputs[3].shape == (64, 1, int(meta["max_seq_len"])) and inputs[4].shape == (64, 1)
    program = torch.export.load(str(model / "program.pt2")).module()
    weights = tuple(torch.load(model / "model.pt", weights_only=True).values())
    with torch.no_grad():
        z = net(*inputs)
        torch.testing.assert_close(program(weights, *inputs), z)
        np.testing.assert_allclose(z.numpy(), want[:64], rtol=0, atol=1e-5)
        one = torch.ones_like(inputs[4])  # every row's tags replaced by its first one (or row 0)
        moved = net(*inputs[:4], one)
    assert (moved - z).abs().max() > 1e-4


@pytest.mark.slow  # two short trainings, ~1 min on one loaded core
def test_the_model_with_the_tags_beats_the_model_without(multi_data, tmp_path):
    """The label is in the tags: CCTL reads them (a pooled bag in the user token) and gets a clearly
    better AUC than on the same data prepared without them. Seed 0."""
    raw, data = multi_data
    no_tags = "".join(line for line in FEATURES.splitlines(keepends=True) if "name: tags" not in line)
    no_tags = no_tags.replace("{name: tag, vocab: {}}, ", "")
    assert "tags" not in no_tags
    plain = str(tmp_path / "plain")
    assert main(["prepare", "--features", _write(tmp_path, no_tags, "no.yaml"), "--data", raw, "--out", plain]) == 0
    aucs = {}
    for name, root in (("with_tags", data), ("without_tags", plain)):
        run = tmp_path / name
        assert main(["train", "--data", root, "--run-dir", str(run), *SMALL, "run.seed=0"]) == 0
        aucs[name] = json.loads((run / "metrics.json").read_text())["target_test"]["auc"]
    assert aucs["with_tags"] > 0.7 and aucs["without_tags"] < 0.6, aucs


# ------------------------------------------------------------------------------- sharded
def _multi_rank(rank, world, root, sharding):
    from cctl_rec.config import DataConfig, ModelConfig
    from cctl_rec.data.loader import Dataset, build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.distributed.sharding import apply_sparse_optimizer, make_plan, shard
    from cctl_rec.distributed.state import load_full_state
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.schema import shared_attributes
    from cctl_rec.train.sync import sync_mixed_to_pure
    import torch.distributed as tdist

    ds = Dataset(root)
    schemas = ds.schemas
    cfg = ModelConfig(tower=(16, 8), san_hidden=(8,))
    shared = shared_attributes(schemas["src"], schemas["tgt"])
    t = next(iter(ParquetStream(ds.paths("tgt/train"), schemas["tgt"], 32, rank, world)))
    s = next(iter(ParquetStream(ds.paths("src/train"), schemas["src"], 64, rank, world)))
    batch = build_batch(t, s, schemas, DataConfig(batch_size=32, src_ratio=2), shared)
    torch.manual_seed(0)
    ref = CCTL(schemas, cfg, device=torch.device("cpu"))
    model = CCTL(schemas, cfg)
    apply_sparse_optimizer(model, "exact_rowwise_adagrad", 0.1, "cpu")
    plan = make_plan(model, world, "cpu", sharding, 32, pg=tdist.GroupMember.WORLD)
    dmp = shard(model, plan, torch.device("cpu"))
    m = dmp.module
    load_full_state(m, ref.state_dict())
    out, want = dmp(batch), ref(batch)
    res = {k: (getattr(out, k).detach(), getattr(want, k).detach())
           for k in ("logit_tgt", "logit_pure", "logit_src", "x_tgt", "x_src", "ren_id_s", "ren_id_t",
                     "ren_seq_s", "ren_seq_t")}
    opt = torch.optim.Adam([p for n in ("mixed_tower", "san", "pure_tower") for p in getattr(m, n).parameters()])
    (out.logit_tgt.sum() + out.logit_src.sum() + 0.5 * out.logit_pure.sum()).backward()
    opt.step()
    sync_mixed_to_pure(m, opt, optimizer_state=True)
    with torch.no_grad():
        after = (m.predict(batch.tgt, "pure"), m.predict(batch.tgt, "mixed"))
    return {"res": res, "shared": shared, "after": after}


@pytest.mark.dist
def test_sharded_equals_unsharded_with_multi_valued_features(multi_data):
    """2 gloo ranks, table-wise: the sum-pooled shared ``tags`` (16 wide), the mean-pooled source
    ``cats`` (4 wide) and the sum-pooled target ``seq`` give the unsharded model's logits, SAN inputs
    and REN terms, and pure == mixed after the sync."""
    from tests.dist_harness import run_distributed

    _, data = multi_data
    for r in run_distributed(_multi_rank, 2, data, "table_wise"):
        assert r["shared"] == ("tags", "context")
        for k, (got, want) in r["res"].items():
            torch.testing.assert_close(got, want, msg=k)
        torch.testing.assert_close(*r["after"])
