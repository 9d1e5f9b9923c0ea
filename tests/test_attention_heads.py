"""DIN, CoNet and MiNet: attention and cross-unit equations by hand, padding, per-position lookups,
training on the tiny data and the export round trip."""

import json
import math
import typing

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cctl_rec.config import ModelConfig
from cctl_rec.modules.attention import InterestAttention, ItemAttention, TargetAttention, masked_softmax
from cctl_rec.modules.conet import CoNetTower
from cctl_rec.modules.heads import HEADS, build_head
from cctl_rec.modules.interest import DINHead, MiNetHead


def _fill(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn from N(0, 0.5^2): no zero-initialised term hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _relu(v: list[float]) -> list[float]:
    return [max(0.0, a) for a in v]


def _lin(w: torch.Tensor, v: list[float], b=None) -> list[float]:
    """W v (+ b), by hand over python floats."""
    out = [sum(float(w[i, j]) * v[j] for j in range(len(v))) for i in range(w.shape[0])]
    return out if b is None else [o + float(bb) for o, bb in zip(out, b)]


# ---------------------------------------------------------------------------------------------- DIN


def test_din_activation_unit_and_unnormalised_pooling_by_hand():
    att = TargetAttention(2, hidden=(3,))
    _fill(att)
    lin1, prelu, lin2 = att.unit
    a = float(prelu.weight.detach())
    keys = torch.tensor([[[1.0, -2.0], [0.5, 0.3], [9.0, 9.0]], [[-1.0, 0.2], [7.0, -7.0], [3.0, 3.0]]])
    query = torch.tensor([[0.4, 1.5], [-0.6, 0.1]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    want = []
    for b in range(2):
        pooled = [0.0, 0.0]
        for j in range(3):
            if not mask[b, j]:
                continue
            e, c = keys[b, j].tolist(), query[b].tolist()
            z = e + c + [e[i] - c[i] for i in range(2)] + [e[i] * c[i] for i in range(2)]
            h = [v if v > 0 else a * v for v in _lin(lin1.weight, z, lin1.bias)]
            w = _lin(lin2.weight, h, lin2.bias)[0]  # no softmax: the raw activation is the weight
            pooled = [pooled[i] + w * e[i] for i in range(2)]
        want.append(pooled)
    torch.testing.assert_close(att(keys, query, mask), torch.tensor(want), rtol=0, atol=1e-5)


def test_din_padding_changes_nothing():
    torch.manual_seed(0)
    att = TargetAttention(4)
    keys, query = torch.randn(3, 5, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    noisy = torch.where(mask.unsqueeze(-1), keys, 100 * torch.randn(3, 5, 4))
    torch.testing.assert_close(att(keys, query, mask), att(noisy, query, mask), rtol=0, atol=0)
    torch.testing.assert_close(att(keys, query, mask)[0], att(keys[:1, :3], query[:1], mask[:1, :3])[0])
    assert torch.equal(att(keys, query, mask)[2], torch.zeros(4))  # empty history: zeros


def test_din_head_replaces_the_mean_pooled_sequence_field():
    torch.manual_seed(0)
    fields = {"user_id": 0, "seq": 1, "item_id": 2}
    head = DINHead(3 * 4, 4, (8,), fields)
    x, seq, mask = torch.randn(5, 12), torch.randn(5, 6, 4), torch.rand(5, 6) > 0.4
    v = x.view(5, 3, 4).clone()
    v[:, 1] = head.attention(seq, v[:, 2], mask)
    torch.testing.assert_close(head(x, seq, mask), head.tower(v.flatten(1)))
    # the mean-pooled field itself is not read: changing it leaves the logit as it is
    x2 = x.clone()
    x2[:, 4:8] = 50.0
    torch.testing.assert_close(head(x2, seq, mask), head(x, seq, mask))


# -------------------------------------------------------------------------------------------- MiNet


def test_masked_softmax_gives_padding_zero_and_an_empty_row_zeros():
    s = torch.tensor([[1.0, 2.0, 30.0], [0.5, -1.0, 2.0]])
    m = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_softmax(s, m)
    e1, e2 = math.exp(1.0), math.exp(2.0)
    torch.testing.assert_close(out[0], torch.tensor([e1 / (e1 + e2), e2 / (e1 + e2), 0.0]))
    assert torch.equal(out[1], torch.zeros(3))


def test_minet_item_level_attention_by_hand():
    att = ItemAttention(2, hidden=3, transfer=True)
    _fill(att, 1)
    w, h, m = att.score[0], att.score[2], att.transfer.weight
    keys = torch.tensor([[[1.0, -2.0], [0.5, 0.3], [4.0, 4.0]]])
    q, u = torch.tensor([[0.4, 1.5]]), torch.tensor([[-0.3, 0.8]])
    mask = torch.tensor([[True, True, False]])
    qv, uv = q[0].tolist(), u[0].tolist()
    mq = _lin(m, qv)
    scores = []
    for j in range(2):
        r = keys[0, j].tolist()
        z = r + qv + uv + [r[i] * mq[i] for i in range(2)]
        scores.append(_lin(h.weight, _relu(_lin(w.weight, z, w.bias)))[0])
    alpha = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
    want = [sum(alpha[j] * float(keys[0, j, i]) for j in range(2)) for i in range(2)]
    torch.testing.assert_close(att(keys, q, u, mask), torch.tensor([want]), rtol=0, atol=1e-5)
    noisy = keys.clone()
    noisy[0, 2] = torch.tensor([-80.0, 70.0])
    torch.testing.assert_close(att(noisy, q, u, mask), att(keys, q, u, mask), rtol=0, atol=0)
    # an empty source history gives a zero interest
    assert torch.equal(att(keys, q, u, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_minet_interest_level_weights_by_hand():
    att = InterestAttention(2, 3, hidden=3)
    _fill(att, 2)
    z = torch.tensor([[[1.0, 0.5], [-0.2, 0.7], [0.3, -1.1]]])
    q, u = torch.tensor([[0.4, 1.5]]), torch.tensor([[-0.3, 0.8]])
    want = []
    for k in range(3):
        lin1, _, lin2 = att.score[k]
        a = _lin(lin2.weight, _relu(_lin(lin1.weight, q[0].tolist() + u[0].tolist() + z[0, k].tolist(),
                                          lin1.bias)), lin2.bias)[0]
        want.append([math.exp(a) * float(v) for v in z[0, k]])  # exp, not normalised over interests
    torch.testing.assert_close(att(z, q, u), torch.tensor([want]), rtol=0, atol=1e-5)


def test_minet_head_composes_the_three_interests():
    torch.manual_seed(0)
    fields = {"user_id": 0, "seq": 1, "item_id": 2, "context": 3}
    head = MiNetHead(4 * 4, 4, (8,), fields)
    x = torch.randn(5, 16)
    seq, other = torch.randn(5, 6, 4), torch.randn(5, 6, 4)
    sm, om = torch.rand(5, 6) > 0.3, torch.rand(5, 6) > 0.5
    v = x.view(5, 4, 4)
    q, p = v[:, 2], v[:, 0]
    z = head.interests(torch.stack([p, head.src_items(other, q, p, om), head.tgt_items(seq, q, p, sm)], 1), q, p)
    inp = torch.cat([z[:, 0], z[:, 2], q, v[:, 3], z[:, 1]], dim=1)
    torch.testing.assert_close(head(x, seq, sm, other, om), head.tower(inp))
    # the source sequence matters (the point of MiNet), its padding does not
    assert not torch.allclose(head(x, seq, sm, other, om), head(x, seq, sm, other.flip(0), om.flip(0)))
    noisy = torch.where(om.unsqueeze(-1), other, 9 * torch.randn(5, 6, 4))
    torch.testing.assert_close(head(x, seq, sm, noisy, om), head(x, seq, sm, other, om), rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- CoNet


def test_conet_cross_unit_by_hand():
    net = CoNetTower(3, (2,))
    _fill(net, 3)
    x = [0.7, -1.2, 0.4]
    wt, ws, h = net.w["tgt"][0], net.w["src"][0], net.h[0]
    a_t = _relu([a + b for a, b in zip(_lin(wt.weight, x, wt.bias), _lin(h.weight, x))])  # a_src^0 = x
    a_s = _relu([a + b for a, b in zip(_lin(ws.weight, x, ws.bias), _lin(h.weight, x))])
    for domain, a in (("tgt", a_t), ("src", a_s)):
        out = net.out[domain]
        want = _lin(out.weight, a, out.bias)[0]
        torch.testing.assert_close(net(torch.tensor([x]), domain), torch.tensor([want]), rtol=0, atol=1e-6)


def test_conet_second_layer_crosses_the_columns_with_one_shared_matrix():
    torch.manual_seed(0)
    net = CoNetTower(4, (3, 2))
    _fill(net, 4)
    x = torch.randn(5, 4)
    a_t, a_s = net.columns(x)
    t1 = torch.relu(net.w["tgt"][0](x) + net.h[0](x))
    s1 = torch.relu(net.w["src"][0](x) + net.h[0](x))
    torch.testing.assert_close(a_t, torch.relu(net.w["tgt"][1](t1) + net.h[1](s1)))
    torch.testing.assert_close(a_s, torch.relu(net.w["src"][1](s1) + net.h[1](t1)))
    assert len(net.h) == 2 and not any(n.startswith("h.") and "bias" in n for n, _ in net.named_parameters())
    # the target logit depends on the source column through the cross unit
    net(x, "tgt").sum().backward()
    assert net.w["src"][0].weight.grad.abs().sum() > 0
    # the pure (served) tower: the mixed one without what only the source logit reads
    pure = CoNetTower(4, (3, 2), ("tgt",))
    mixed = dict(net.named_parameters())
    assert set(mixed) - set(dict(pure.named_parameters())) == {"w.src.1.weight", "w.src.1.bias",
                                                               "out.src.weight", "out.src.bias"}
    pure.load_state_dict({k: v for k, v in net.state_dict().items() if k in pure.state_dict()})
    torch.testing.assert_close(pure(x), net(x, "tgt"))


# --------------------------------------------------------------------------- config and lookups


def test_config_heads_match_the_builder_and_bad_heads_fail_in_one_line():
    assert typing.get_args(typing.get_type_hints(ModelConfig)["head"]) == HEADS
    for kwargs, text in (({"name": "cctl", "head": "din"}, "use it with model.name=dnn"),
                         ({"name": "cctl", "head": "minet"}, "use it with model.name=dnn"),
                         ({"name": "dnn", "head": "conet"}, "use it with model.name=cctl")):
        with pytest.raises(ValueError, match=text) as e:
            ModelConfig(**kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs the field layout"):
        build_head("din", 8, 2, (4,))


def test_widths_of_zero_or_less_are_refused_in_one_line():
    """A CoNet tower or DIN activation unit 0 wide would build (torch makes 0-input layers) and score
    every row by its biases alone: 0 is refused where it is built, as a negative width is."""
    for build, text in ((lambda: CoNetTower(0, (8,)),
                         "CoNet needs an input width > 0 and at least one hidden layer, got 0, [8]"),
                        (lambda: CoNetTower(-3, (8,)), "got -3, [8]"),
                        (lambda: CoNetTower(4, ()), "got 4, []"),
                        (lambda: TargetAttention(0),
                         "TargetAttention needs dim > 0 and hidden widths > 0, got 0, [36]"),
                        (lambda: TargetAttention(-1), "got -1, [36]"),
                        (lambda: TargetAttention(4, hidden=(8, 0)), "got 4, [8, 0]")):
        with pytest.raises(ValueError) as e:
            build()
        assert text in str(e.value) and "\n" not in str(e.value)


def test_bad_head_on_the_command_line_is_one_line(tiny_data, tmp_path, capsys):
    from cctl_rec.cli import main

    rc = main(["train", "--config", "configs/cctl_tiny.yaml", "--data", tiny_data, "--run-dir",
               str(tmp_path / "r"), "model.head=dien"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.head must be one of" in err and "'dien'" in err
    rc = main(["train", "--config", "configs/cctl_tiny.yaml", "--data", tiny_data, "--run-dir",
               str(tmp_path / "r"), "model.head=din"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.head=din" in err


def test_position_features_by_hand():
    from cctl_rec.data.reader import position_features

    got = position_features(np.array([1, 2, 3, 4]), np.array([3, 0, 1]), ["k@0", "k@1", "k@2", "k@3"])
    want = {"k@0": ([1, 4], [1, 0, 1]), "k@1": ([2], [1, 0, 0]), "k@2": ([3], [1, 0, 0]), "k@3": ([], [0, 0, 0])}
    assert {k: (v.tolist(), l.tolist()) for k, (v, l) in got.items()} == want


def test_positions_are_the_item_table_rows_of_the_sequences(tiny_data):
    """CCTL's per-position inputs: the j-th item's row of the target item table (other_seq too),
    masked past each row's length; the same vectors the candidate item_id is looked up in."""
    from cctl_rec.config import DataConfig
    from cctl_rec.data.loader import Dataset, eval_batches
    from cctl_rec.data.reader import ParquetStream, column_ids
    from cctl_rec.models.cctl import CCTL

    data = Dataset(tiny_data)
    model = CCTL(data.schemas, ModelConfig(name="dnn", head="minet", tower=(8,)), with_source=False,
                 device=torch.device("cpu"), seq_len=20)
    table = model.pure_tgt.embedding_bags["t_item_id"].weight
    cfg = DataConfig(eval_batch_size=32)
    batch = next(eval_batches(data, "tgt/test", cfg, 0, 1, positions=model.positions))
    rows = next(iter(ParquetStream(data.paths("tgt/test"), data.schemas["tgt"], 32, drop_last=False)))
    _, (seq, seq_mask, other, other_mask) = model.target_inputs(batch.tgt)
    for col, emb, mask in (("seq", seq, seq_mask), ("other_seq", other, other_mask)):
        v, lens = column_ids(rows, col, 120, 20)
        assert emb.shape == (32, 20, 8) and torch.equal(mask, torch.arange(20)[None] < torch.from_numpy(lens)[:, None])
        starts = np.cumsum(lens) - lens
        for b in range(32):
            torch.testing.assert_close(emb[b, :lens[b]], table[torch.tensor(v[starts[b]:starts[b] + lens[b]])])
            assert torch.equal(emb[b, lens[b]:], torch.zeros(20 - lens[b], 8))


def test_other_seq_outside_the_target_item_table_fails_in_one_line(tmp_path):
    from cctl_rec.config import DataConfig
    from cctl_rec.data.loader import build_batch
    from cctl_rec.data.reader import ParquetStream
    from cctl_rec.schema import SeqPositions, synthetic_schemas

    schemas = synthetic_schemas(300, 120, 6, 20, n_cities=30)
    small = synthetic_schemas(300, 50, 6, 20, n_cities=30)  # a target item table of 50 rows
    schemas = {"tgt": small["tgt"], "src": schemas["src"]}
    t = pa.table({"user_id": [1], "gender": [0], "device": [0], "seq": pa.array([[3]], pa.list_(pa.int64())),
                  "item_id": [4], "category": [0], "brand": [0], "hour": [0], "position": [0],
                  "other_seq": pa.array([[7, 99]], pa.list_(pa.int64())), "user_in_other": [True],
                  "item_in_other": [True], "label": pa.array([1], pa.int8())})
    pq.write_table(t, tmp_path / "t.parquet")
    rows = next(iter(ParquetStream([str(tmp_path / "t.parquet")], schemas["tgt"], 1)))
    with pytest.raises(ValueError, match=r"other_seq \(looked up in the target item table\)' has id 99 >= table "
                                         r"size 50") as e:
        build_batch(rows, None, schemas, DataConfig(), positions=SeqPositions(("seq", "other_seq"), 20))
    assert "\n" not in str(e.value)
    build_batch(rows, None, schemas, DataConfig(), positions=SeqPositions(("seq",), 20))  # DIN: other_seq unread
    # `cctl-rec train` finds it before training, from the footer statistics
    from cctl_rec.data.reader import check_list_bounds, open_parquet

    path = str(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="has id 99 >= table size 50"):
        check_list_bounds(path, open_parquet(path), "other_seq", 50, "other_seq (looked up in the target item table)")
    check_list_bounds(path, open_parquet(path), "other_seq", 120, "other_seq")


# ---------------------------------------------------------------------- training and export


@pytest.mark.slow  # trains and exports each head: 2-6 s each on one core
@pytest.mark.parametrize("overrides", [["model.name=dnn", "model.head=din"], ["model.name=dnn", "model.head=minet"],
                                       ["model.head=conet", "selector.mode=fixed"]])
def test_trains_and_export_serves_the_same_logits(tiny_data, tmp_path, overrides):
    from cctl_rec.cli import main
    from cctl_rec.export import load_artifact, serving_inputs

    run, exp = tmp_path / "run", tmp_path / "exp"
    rc = main(["train", "--config", "configs/cctl_tiny.yaml", "--data", tiny_data, "--run-dir", str(run),
               "data.batch_size=64", "run.steps=8", "run.log_every=4", "model.tower=[16,8]",
               "run.save_predictions=true", "run.max_eval_rows=0", *overrides])
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 8 and 0.0 < m["target_test"]["auc"] < 1.0
    assert all(math.isfinite(h["loss_pure"]) for h in m["history"]) and len(m["history"]) == 2
    if "model.head=conet" in overrides:
        assert all(math.isfinite(h["loss_src"]) and h["loss_src"] > 0 for h in m["history"])
    assert main(["export", "--run-dir", str(run), "--out", str(exp)]) == 0
    meta = json.loads((exp / "serving.json").read_text())
    head = overrides[-1].split("=")[1] if "dnn" in overrides[0] else "conet"
    assert meta["head"] == head and meta["program"] == "program.pt2"
    assert meta["inputs"][-1] == ("other_len" if head == "minet" else "seq_len")
    out = tmp_path / "pred.parquet"
    assert main(["predict", "--model", str(exp), "--data", tiny_data, "--out", str(out)]) == 0
    got = torch.tensor(pq.read_table(out).column("logit").to_numpy())
    want = torch.tensor(pq.read_table(run / "predictions-tgt-test.parquet").column("logit").to_numpy())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    model, meta = load_artifact(str(exp))
    table = pq.read_table(f"{tiny_data}/tgt/test/part-00000.parquet").slice(0, 9)
    inputs = serving_inputs(model, table, meta["max_seq_len"], "t")
    program = torch.export.load(str(exp / "program.pt2"))  # the weights are its first input (model.pt)
    weights = tuple(model.state_dict()[k] for k in meta["weights"])
    torch.testing.assert_close(program.module()(weights, *inputs), model(*inputs))
