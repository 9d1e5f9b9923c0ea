"""Each paper equation pinned against a hand computation on a toy batch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cctl_rec.data.batch import CCTLBatch
from cctl_rec.models.cctl import CCTLOutput
from cctl_rec.modules.ren import ren_loss
from cctl_rec.modules.selector import Selector
from cctl_rec.train.losses import scn_losses
from cctl_rec.train.reinforce import Reinforce, RewardShaper


def _bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _toy(weights_req_grad=False):
    out = CCTLOutput(logit_tgt=torch.tensor([0.5, -1.0]), logit_pure=torch.tensor([0.2, -0.3]),
                     logit_src=torch.tensor([2.0, -0.5, 0.1]))
    from torchrec import KeyedJaggedTensor
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([0, 1]), lengths=torch.tensor([1, 1]))
    b = CCTLBatch(tgt=kjt, tgt_label=torch.tensor([1.0, 0.0]), user_in_other=torch.tensor([True, False]),
                  item_in_other=torch.tensor([False, False]), seq_mask=torch.tensor([False, False]),
                  src_label=torch.tensor([1.0, 1.0, 0.0]))
    w = torch.tensor([0.9, 0.2, 0.5], requires_grad=weights_req_grad)
    return out, b, w


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_eq3_eq4_eq5_against_hand_computation(reduction):
    out, b, w = _toy()
    L = scn_losses(out, b, w, reduction)
    red = (lambda xs: sum(xs)) if reduction == "sum" else (lambda xs: sum(xs) / len(xs))
    tgt = red([_bce(0.5, 1), _bce(-1.0, 0)])
    src = red([0.9 * _bce(2.0, 1), 0.2 * _bce(-0.5, 1), 0.5 * _bce(0.1, 0)])
    pure = red([_bce(0.2, 1), _bce(-0.3, 0)])
    assert float(L.tgt) == pytest.approx(tgt, rel=1e-6)
    assert float(L.src) == pytest.approx(src, rel=1e-6)
    assert float(L.mixed) == pytest.approx(src + tgt, rel=1e-6)   # Eq. 3
    assert float(L.pure) == pytest.approx(pure, rel=1e-6)         # Eq. 4
    assert float(L.reward) == pytest.approx(pure - tgt, rel=1e-6)  # Eq. 5


def test_tower_loss_never_trains_the_selector():
    torch.manual_seed(0)
    sel = Selector(4, (8,))
    x = torch.randn(3, 4, requires_grad=True)
    p = sel(x)
    out, b, _ = _toy()
    out.logit_src = out.logit_src.clone().requires_grad_(True)
    L = scn_losses(out, b, p, "mean")
    L.mixed.backward()
    assert all(q.grad is None for q in sel.parameters())  # p is detached in Eq. 3
    assert out.logit_src.grad is not None and out.logit_src.grad.abs().sum() > 0


def test_eq12_ren_against_hand_computation():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    id_mask = torch.tensor([True, True, False])
    s1 = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    s2 = torch.tensor([[2.0, 4.0], [0.0, 1.0]])
    seq_mask = torch.tensor([True, True])
    loss, cid, cseq = ren_loss(a, b, id_mask, s1, s2, seq_mask)
    want_id = (0.0 + 1 / math.sqrt(2)) / 2          # third pair masked out
    want_seq = (1.0 + 0.0) / 2
    assert float(cid) == pytest.approx(want_id, abs=1e-6)
    assert float(cseq) == pytest.approx(want_seq, abs=1e-6)
    assert float(loss) == pytest.approx(want_id - want_seq, abs=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_eq9_discounted_return_matches_brute_force(causal):
    rng = np.random.default_rng(0)
    n, gamma, alpha, n_src = 7, 0.8, 0.5, 5
    g = [rng.normal(size=(3, 2)) for _ in range(n)]
    r = rng.normal(size=n)
    theta0 = rng.normal(size=(3, 2))
    p = torch.nn.Parameter(torch.tensor(theta0))
    rl = Reinforce([p], alpha=alpha, gamma=gamma, update_every=n, causal=causal)
    for t in range(n):
        rl.observe([torch.tensor(g[t])], float(r[t]), n_src)
        assert rl.maybe_update(t + 1) == (t + 1 == n)
    # brute force: sum_k g_k * r_accu_k, r_accu_k = sum_{j>=0} gamma^j r_{k+j}; causal: the first
    # reward after step k (r_{k+1}) gets weight 1, r_accu_k = sum_{j>=1} gamma^(j-1) r_{k+j}
    G = np.zeros((3, 2))
    for k in range(n):
        if causal:
            racc = sum(gamma ** (t - k - 1) * r[t] for t in range(k + 1, n))
        else:
            racc = sum(gamma ** (t - k) * r[t] for t in range(k, n))
        G += g[k] * racc
    want = theta0 + alpha * G / (n * n_src)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-10, atol=1e-12)
    assert all(float(t.abs().sum()) == 0 for t in rl.trace + rl.acc)  # a new window starts


def test_selector_logits_are_clamped_and_p_in_bounds():
    sel = Selector(2, (4,), logit_clamp=3.0)
    for bias in (100.0, -100.0):                     # logit = the output bias: clamped to +-3
        with torch.no_grad():
            for q in sel.parameters():
                q.zero_()
            sel.net[-1].bias.fill_(bias)
        p = sel(torch.randn(5, 2))
        torch.testing.assert_close(p, torch.sigmoid(torch.full((5,), 3.0 if bias > 0 else -3.0)))


def test_reward_shaper_baseline_and_norm():
    s = RewardShaper(ema_baseline=0.5)
    assert s(1.0) == 0.0          # first reward is its own baseline
    assert s(3.0) == pytest.approx(2.0)   # baseline was 1.0, becomes 2.0
    assert s(2.0) == pytest.approx(0.0)
    n = RewardShaper(normalize=True)
    assert n(4.0) == pytest.approx(1.0)
    assert abs(n(-4.0)) == pytest.approx(1.0)


def test_shared_attributes_exclude_ids_and_mismatches():
    from cctl_rec.schema import shared_attributes, synthetic_schemas

    s = synthetic_schemas(100, 50, 5, 7)
    assert shared_attributes(s["src"], s["tgt"]) == ("gender", "device", "category", "brand", "hour")


@pytest.mark.parametrize("head,eval_loss", [("mlp", "bce"), ("mlp", "pairwise"), ("deepfm", "bce")])
def test_per_sample_influence_equals_a_loop_over_samples(head, eval_loss):
    """The MLP tower's one-backward path and the other heads' double backward give the loop's
    grad l_i . grad L_eval (output bias left out) for each source row."""
    from cctl_rec.modules.heads import DeepFMHead
    from cctl_rec.modules.tower import Tower
    from cctl_rec.train.ifn import _mlp_sequence, pairwise_loss, per_sample_influence

    torch.manual_seed(0)
    net = Tower(6, (5, 3)) if head == "mlp" else DeepFMHead(6, 3, (4,))
    assert (_mlp_sequence(net) is None) == (head != "mlp")
    xs, ys = torch.randn(7, 6), (torch.rand(7) < 0.5).float()
    xe, ye = torch.randn(9, 6), torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 0])
    got = per_sample_influence(net, xs, ys, xe, ye, eval_loss=eval_loss)
    last_bias = [n for n, _ in net.named_parameters() if n.endswith("bias")][-1]
    params = [p for n, p in net.named_parameters() if n != last_bias]
    l_eval = pairwise_loss(net(xe), ye) if eval_loss == "pairwise" else F.binary_cross_entropy_with_logits(net(xe), ye)
    ge = torch.autograd.grad(l_eval, params)
    want = []
    for i in range(7):
        gi = torch.autograd.grad(F.binary_cross_entropy_with_logits(net(xs[i:i + 1]), ys[i:i + 1]), params)
        want.append(sum((a * b).sum() for a, b in zip(gi, ge)))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in net.parameters())  # the lookahead leaves the tower's grads alone


def test_pairwise_loss_by_hand_and_blind_to_a_shift():
    from cctl_rec.train.ifn import pairwise_loss

    f, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    want = (math.log1p(math.exp(-(2.0 + 1.0))) + math.log1p(math.exp(-(2.0 - 0.5)))) / 2
    assert abs(float(pairwise_loss(f, y)) - want) < 1e-6
    assert abs(float(pairwise_loss(f + 3.7, y)) - want) < 1e-5
    assert float(pairwise_loss(f, torch.zeros(3))) == 0.0  # one class only: no pairs


def test_influence_groups_by_hand():
    """zbar = decayed sum / decayed count of the z of the rows sharing an id (decay 0.5)."""
    from cctl_rec.train.influence_groups import InfluenceGroups

    g = InfluenceGroups("item_id", 5, decay=0.5)
    zbar = g(torch.tensor([1, 1, 2]), torch.tensor([1.0, 3.0, 5.0]))
    torch.testing.assert_close(zbar, torch.tensor([2.0, 2.0, 5.0]))
    # id 1: S = 0.5 * 4 + 0 = 2, N = 0.5 * 2 + 1 = 2; id 2 is not seen, so it does not decay
    torch.testing.assert_close(g(torch.tensor([1]), torch.tensor([0.0])), torch.tensor([1.0]))
    assert float(g.sum[2]) == 5.0 and float(g.count[2]) == 1.0
    with pytest.raises(ValueError, match=r"selector.influence_group=item_id: id 5 outside \[0, 5\)"):
        g(torch.tensor([5]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="choose a coarser source feature"):
        InfluenceGroups("user_id", 10**9, 0.9)


def _groups_on_rank(rank, world):
    from cctl_rec.train.influence_groups import InfluenceGroups

    g = InfluenceGroups("item_id", 4, decay=0.0)
    ids = torch.tensor([0, 1]) if rank == 0 else torch.tensor([1, 1, 3])
    z = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([4.0, 6.0, 7.0])
    return g(ids, z), g.sum.clone(), g.count.clone()


@pytest.mark.dist
def test_influence_groups_pool_every_rank():
    """Each rank's zbar averages the rows of every rank, and the tables stay identical."""
    from tests.dist_harness import run_distributed

    (z0, s0, n0), (z1, s1, n1) = run_distributed(_groups_on_rank, 2)
    torch.testing.assert_close(z0, torch.tensor([1.0, 4.0]))          # id 1: (2 + 4 + 6) / 3
    torch.testing.assert_close(z1, torch.tensor([4.0, 4.0, 7.0]))
    assert torch.equal(s0, s1) and torch.equal(n0, n1)


def test_influence_selector_is_held_to_its_keep_rate():
    """With no information in the influence (all equal), the only force on the selector is the
    keep penalty: mean p moves from 0.5 to selector.influence_keep; with keep 0 it stays."""
    from cctl_rec.config import SelectorConfig
    from cctl_rec.train.ifn import IFN

    x, y = torch.randn(256, 6), (torch.rand(256) < 0.1).float()
    for keep, lo, hi in [(0.2, 0.15, 0.25), (0.0, 0.49, 0.51)]:
        torch.manual_seed(0)
        ifn = IFN(SelectorConfig(mode="influence", influence_group="", influence_keep=keep, lr=1e-2), 6)
        with torch.no_grad():
            ifn.selector.net[-1].weight.zero_()   # p = 0.5 on every row to start
        for step in range(300):
            logits = ifn.selector.logits(x)
            ifn.step(step, logits, 0.0, None, None, influence=torch.ones(256), labels=y)
        p = float(torch.sigmoid(ifn.selector.logits(x)).mean())
        assert lo < p < hi, (keep, p)


def test_influence_keep_rate_follows_the_label_balance():
    """selector.influence_keep=null: the keep rate is the source's mean label-shift weight
    sum_y P_s(y) w_y, w_y = (r_y / max r)^power, r_y = P_t(y) / P_s(y). Hand computation: source 50%
    positive, target 20% positive -> r = (0.8/0.5, 0.2/0.5) = (1.6, 0.4), w = (1, 0.25^0.5 = 0.5),
    keep = 0.5 * 1 + 0.5 * 0.5 = 0.75; the selector's mean p goes there. Same label balance in both
    domains: keep 1, and p rises from 0.5 towards 1 (the amount of source Mix keeps)."""
    from cctl_rec.config import SelectorConfig
    from cctl_rec.train.ifn import IFN

    x = torch.randn(200, 6)
    y_src = (torch.arange(200) % 2).float()                      # 50% positive
    for tgt_pos, keep, lo, hi in [(0.2, 0.75, 0.70, 0.80), (0.5, 1.0, 0.9, 1.0)]:
        y_tgt = (torch.arange(100) < 100 * tgt_pos).float()
        torch.manual_seed(0)
        ifn = IFN(SelectorConfig(mode="influence", influence_group="", lr=1e-2, evidence_shift_power=0.5), 6)
        with torch.no_grad():
            ifn.selector.net[-1].weight.zero_()
        assert ifn.keep_rate() == 1.0                               # nothing seen yet
        for step in range(300):
            out = ifn.step(step, ifn.selector.logits(x), 0.0, None, None, influence=torch.ones(200), labels=y_src,
                           tgt_labels=y_tgt)
        assert abs(out["influence_keep"] - keep) < 1e-9, (tgt_pos, out["influence_keep"])
        p = float(torch.sigmoid(ifn.selector.logits(x)).mean())
        assert lo < p < hi, (tgt_pos, p)


def _equations_on_rank(rank, world):
    """Each rank feeds different numbers to the parts that talk across ranks (see below)."""
    from cctl_rec.config import SelectorConfig
    from cctl_rec.train.ifn import IFN
    from cctl_rec.train.reward import rank_mean

    out = {}
    # Reinforce.update: G and N summed over ranks, theta += alpha * G / N on every rank (two tensors)
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    q = torch.nn.Parameter(torch.tensor([0.5, 1.5], dtype=torch.float64))
    rl = Reinforce([p, q], alpha=0.5, gamma=0.0, update_every=1)
    g = [[1.0, 2.0], [3.0, -2.0]] if rank == 0 else [[-4.0, 0.5], [1.0, 4.0]]
    rl.observe([torch.tensor(x, dtype=torch.float64) for x in g], reward=2.0 if rank == 0 else -1.0,
               n_samples=3 if rank == 0 else 5)
    assert rl.maybe_update(1)
    out["theta"] = (p.detach().clone(), q.detach().clone())
    # REN's masked means over the global batch (global_counts): 3 id pairs (2 on rank 0) and 2
    # sequence pairs (one per rank)
    ids = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 4.0]]) if rank == 0 else ids.clone()
    id_mask = torch.tensor([True, True, False]) if rank == 0 else torch.tensor([False, False, True])
    seq = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    seq_other = torch.tensor([[2.0, 4.0], [0.0, 1.0]])
    seq_mask = torch.tensor([True, False]) if rank == 0 else torch.tensor([False, True])
    out["ren"] = [float(t) for t in ren_loss(ids, other, id_mask, seq, seq_other, seq_mask)]
    none3, none2 = torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    out["ren_empty"] = [float(t) for t in ren_loss(ids, other, none3, seq, seq_other, none2)]
    # the reward: one mean over ranks
    out["reward"] = rank_mean(0.2 if rank == 0 else -0.6)
    # the selector: built from different seeds, rank 0's on every rank; an influence step with
    # each rank's own influence moves both by the mean gradient, with one influence scale
    torch.manual_seed(rank)
    ifn = IFN(SelectorConfig(mode="influence", hidden=(4,), influence_group="", influence_keep=0.0, lr=0.1,
                             influence_norm="scale"), 3)
    out["theta0"] = [t.detach().clone() for t in ifn.selector.parameters()]
    torch.manual_seed(0)                                  # rank 0's selector, built here without the broadcast
    out["rank0_init"] = [t.detach().clone() for t in Selector(3, ifn.cfg.hidden, ifn.cfg.logit_clamp,
                                                              ifn.cfg.init_p).parameters()]
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(rank + 10))
    infl = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0]) * (1.0 if rank == 0 else -3.0)
    ifn.step(1, ifn.selector.logits(x), 0.0, None, None, influence=infl, labels=torch.zeros(6))
    out["theta1"] = [t.detach().clone() for t in ifn.selector.parameters()]
    out["infl_scale"] = ifn.infl_scale
    return out


@pytest.mark.dist
def test_equations_on_two_ranks():
    """What crosses ranks, by hand: the REINFORCE window's G and N are summed over ranks before
    theta += alpha * G / N; REN's masked means are over the global batch (0 where the global mask
    is empty); the reward is one mean; the selector starts as rank 0's and moves by the ranks' mean
    gradient with one influence scale."""
    from tests.dist_harness import run_distributed

    r0, r1 = run_distributed(_equations_on_rank, 2)
    # gamma = 0: G = r g on each rank; (2 * [1, 2] + -1 * [-4, 0.5]) / (3 + 5) = [6, 3.5] / 8,
    # (2 * [3, -2] - [1, 4]) / 8 = [5, -8] / 8 (two tensors of two values: each read at its own offset)
    want_p = torch.tensor([1.0 + 0.5 * 6 / 8, -2.0 + 0.5 * 3.5 / 8], dtype=torch.float64)
    want_q = torch.tensor([0.5 + 0.5 * 5 / 8, 1.5 + 0.5 * -8 / 8], dtype=torch.float64)
    for r in (r0, r1):
        torch.testing.assert_close(r["theta"][0], want_p, rtol=0, atol=1e-12)
        torch.testing.assert_close(r["theta"][1], want_q, rtol=0, atol=1e-12)
    # each rank's mean is its masked sum over (global count / world): ids 3 / 2, sequences 2 / 2.
    # id cosines: rank 0 holds 0 and 1/sqrt(2), rank 1 holds 1; sequences: rank 0 1, rank 1 0
    assert r0["ren"][1] == pytest.approx((1 / math.sqrt(2)) / 1.5, abs=1e-6)
    assert r1["ren"][1] == pytest.approx(1 / 1.5, abs=1e-6)
    assert r0["ren"][2] == pytest.approx(1.0, abs=1e-6) and r1["ren"][2] == pytest.approx(0.0, abs=1e-6)
    assert r0["ren"][0] == pytest.approx(r0["ren"][1] - r0["ren"][2], abs=1e-6)
    assert r0["ren_empty"] == [0.0, 0.0, 0.0] and r1["ren_empty"] == [0.0, 0.0, 0.0]
    assert r0["reward"] == pytest.approx(-0.2) and r1["reward"] == pytest.approx(-0.2)
    for a, b, c in zip(r0["theta0"], r1["theta0"], r0["rank0_init"]):
        assert torch.equal(a, b) and torch.equal(a, c)   # rank 0's selector broadcast (not rank 1's)
    for a, b in zip(r0["theta1"], r1["theta1"]):
        assert torch.equal(a, b)                      # the same (mean) step on both ranks
    assert any(not torch.equal(a, b) for a, b in zip(r0["theta0"], r0["theta1"]))
    # one scale: the mean over ranks of mean |influence| (9.5 / 6 and 3 x that): 19 / 6
    assert r0["infl_scale"] == pytest.approx(19 / 6) and r1["infl_scale"] == pytest.approx(19 / 6)


# ----------------------------------------------------------------------------- the edges of each equation
# (each found by scripts/mutate.py: a one-line change of the code no other test saw, docs/testing.md)


def _with_ren_and_domain():
    out, b, w = _toy()
    out.ren_id_s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.5, -1.0]], requires_grad=True)
    out.ren_id_t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    out.ren_seq_s = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    out.ren_seq_t = torch.tensor([[2.0, 4.0], [1.0, 1.0]])
    b.seq_mask = torch.tensor([True, True])
    b.item_in_other = torch.tensor([True, False])
    out.logit_domain = torch.tensor([0.3, -0.2, 1.5, -1.0, 0.4])        # B_t = 2 target rows, then 3 source
    return out, b, w


def test_scn_losses_defaults_and_the_dann_term_by_hand():
    """By default Loss_mixed = Loss_src + Loss_tgt (REN and DANN off even when the forward has their
    inputs); with dann_weight the domain BCE (target rows 0, source rows 1) is added; the logged
    REN cosines and the reward carry no graph."""
    out, b, w = _with_ren_and_domain()
    d = scn_losses(out, b, w)
    assert float(d.mixed) == pytest.approx(float(d.src + d.tgt), abs=1e-7)
    dom = sum(_bce(z, y) for z, y in zip([0.3, -0.2, 1.5, -1.0, 0.4], [0, 0, 1, 1, 1])) / 5
    with_dann = scn_losses(out, b, w, dann_weight=0.5)
    assert float(with_dann.mixed) == pytest.approx(float(d.src + d.tgt) + 0.5 * dom, rel=1e-6)
    assert not (d.cos_id.requires_grad or d.cos_seq.requires_grad or d.reward.requires_grad)


def test_scn_losses_with_no_source_rows():
    """A step without source rows (B_s = 0): Loss_src is 0, not the NaN of an empty mean."""
    out, b, _ = _toy()
    out.logit_src, b.src_label = torch.zeros(0), torch.zeros(0)
    L = scn_losses(out, b, torch.zeros(0), "mean")
    assert float(L.src) == 0.0 and float(L.mixed) == pytest.approx(float(L.tgt))


def test_eq5_reward_is_detached():
    from cctl_rec.train.reward import eq5

    a, c = torch.tensor(0.9, requires_grad=True), torch.tensor(0.4, requires_grad=True)
    r = eq5(a, c)
    assert float(r) == pytest.approx(0.5) and not r.requires_grad


def test_heldout_reward_is_pure_minus_mixed_on_the_heldout_rows(tiny_data):
    """scn.reward_source=heldout_batch: r = BCE(pure network) - BCE(mixed network) on the held-out
    target rows; step_reward takes it when a held-out batch is given, else the step's own Eq. 5; on
    one process the rank mean of r is r."""
    from cctl_rec.config import ModelConfig
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.train.losses import SCNLosses
    from cctl_rec.train.reward import heldout_reward, rank_mean, step_reward
    from tests.test_sharding import _tiny_batch

    schemas, batch = _tiny_batch(tiny_data, 0, 1, with_src=False)
    torch.manual_seed(0)
    m = CCTL(schemas, ModelConfig(tower=(8, 4), san_hidden=(4,)), device=torch.device("cpu"))
    with torch.no_grad():
        m.mixed_tower.net[-1].bias.add_(2.0)      # the mixed network now predicts more positives
        pure = F.binary_cross_entropy_with_logits(m.predict(batch.tgt, "pure"), batch.tgt_label)
        mixed = F.binary_cross_entropy_with_logits(m.predict(batch.tgt, "mixed"), batch.tgt_label)
    assert abs(float(pure - mixed)) > 0.1
    r = heldout_reward(m, batch)
    assert float(r) == pytest.approx(float(pure - mixed), abs=1e-6)
    own = SCNLosses(*([torch.zeros(())] * 5), reward=torch.tensor(-0.25), cos_id=torch.zeros(()),
                    cos_seq=torch.zeros(()))
    assert step_reward(own, m, None) == -0.25
    assert step_reward(own, m, batch) == pytest.approx(float(pure - mixed), abs=1e-6)
    assert rank_mean(0.3) == pytest.approx(0.3) and rank_mean(-1.5) == pytest.approx(-1.5)


def test_reward_shaper_by_hand():
    """EMA baseline (decay 0.8) on 2, 5, 1: the first reward is its own baseline (0), then
    5 - 2 = 3 (baseline 0.8 * 2 + 0.2 * 5 = 2.6), then 1 - 2.6. RMS normalisation: a first reward
    of 0 stays 0, 0.5 becomes 1, and a tiny reward keeps its sign (the 1e-12 guard is added)."""
    s = RewardShaper(ema_baseline=0.8)
    assert [s(2.0), s(5.0), s(1.0)] == pytest.approx([0.0, 3.0, -1.6])
    assert RewardShaper(normalize=True)(0.0) == 0.0
    assert RewardShaper(normalize=True)(0.5) == pytest.approx(1.0)
    tiny = RewardShaper(normalize=True)
    assert tiny(1e-13) == pytest.approx(1e-13 / (1e-13 + 1e-12))
    assert tiny(-1e-13) < 0


def test_eq9_one_step_window_and_an_empty_window():
    """Defaults (causal=False): a one-step, one-sample window moves theta by alpha * r * g; the
    window's counters restart; an update with no sample observed leaves theta alone."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    rl = Reinforce([p], alpha=0.5, gamma=0.9, update_every=1)
    rl.observe([torch.tensor([2.0, 4.0], dtype=torch.float64)], reward=-1.5, n_samples=1)
    assert rl.maybe_update(1)
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - 1.5, -1.0 - 3.0], dtype=torch.float64))
    assert rl.n == 0.0 and rl.updates == 1
    rl.update()                                           # nothing observed: no step, no division by 0
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, -4.0], dtype=torch.float64))
    assert rl.updates == 2


def test_eq12_ren_masks_zero_rows_and_empty_masks():
    """Masked-out rows may be zero vectors (an empty sequence pools to 0): the loss stays the hand
    value, not NaN; with every row masked out each mean is 0."""
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    s1 = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    s2 = torch.tensor([[0.0, 0.0], [-1.0, 0.0]])
    loss, cid, cseq = ren_loss(a, b, torch.tensor([True, False]), s1, s2, torch.tensor([False, True]))
    assert float(cid) == pytest.approx(1 / math.sqrt(2), abs=1e-6) and float(cseq) == pytest.approx(-1.0, abs=1e-6)
    assert float(loss) == pytest.approx(1 / math.sqrt(2) + 1.0, abs=1e-6)
    none = torch.tensor([False, False])
    assert [float(t) for t in ren_loss(a, b, none, s1, s2, none)] == [0.0, 0.0, 0.0]


def test_centre_per_label_by_hand():
    from cctl_rec.train.ifn import _centre_per_label

    infl, y = torch.tensor([1.0, 3.0, 10.0, 20.0, 2.0]), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(_centre_per_label(infl, y), torch.tensor([-1.0, 1.0, -5.0, 5.0, 0.0]))
    torch.testing.assert_close(infl, torch.tensor([1.0, 3.0, 10.0, 20.0, 2.0]))   # the input is left alone


def test_pairwise_loss_over_every_pair():
    """2 positives x 3 negatives: the mean over the 6 (pos, neg) pairs; one negative: its pairs."""
    from cctl_rec.train.ifn import pairwise_loss

    f, y = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    want = sum(math.log1p(math.exp(n - p)) for p in (2.0, 0.5) for n in (-1.0, 1.0, 0.0)) / 6
    assert float(pairwise_loss(f, y)) == pytest.approx(want, rel=1e-6)
    assert float(pairwise_loss(torch.tensor([1.0, -1.0]), torch.tensor([1.0, 0.0]))) == pytest.approx(
        math.log1p(math.exp(-2.0)), rel=1e-6)


def _influence_ifn(**kw):
    from cctl_rec.config import SelectorConfig
    from cctl_rec.train.ifn import IFN

    torch.manual_seed(0)
    cfg = dict(mode="influence", hidden=(4,), influence_group="", influence_keep=0.3, lr=1e-2)
    return IFN(SelectorConfig(**{**cfg, **kw}), 3)


def test_influence_normalisation_by_hand():
    """z = influence / s clipped to [-5, 5], s the running mean |influence| (0.99 s + 0.01 * this
    batch's, the first batch's to start), + 1e-12 so a tiny influence keeps its sign."""
    ifn = _influence_ifn()
    z = ifn._normalise(torch.tensor([0.0] * 9 + [100.0]))                 # s = 10: 100 / 10 = 10 -> 5
    torch.testing.assert_close(z, torch.tensor([0.0] * 9 + [5.0]))
    z = ifn._normalise(torch.tensor([2.0, -2.0]))                          # s = 0.99 * 10 + 0.01 * 2
    assert ifn.infl_scale == pytest.approx(9.92)
    torch.testing.assert_close(z, torch.tensor([2.0, -2.0]) / 9.92)
    tiny = _influence_ifn()._normalise(torch.tensor([1e-13, -1e-13]))
    torch.testing.assert_close(tiny, torch.tensor([1e-13, -1e-13]) / (1e-13 + 1e-12))


def test_influence_step_follows_its_objective_by_hand():
    """One influence-mode step: the selector's gradient is that of
    -mean_i(z_i p_i) + 10 (mean p - keep)^2 with z the per-label centred influence over its mean
    magnitude, and the step logs the share of rows whose centred influence is positive."""
    from cctl_rec.train.ifn import KEEP_PENALTY

    ifn = _influence_ifn()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    infl = torch.tensor([0.0, 1.5, 3.0, -1.0, 3.0, 4.0])
    c = torch.tensor([-1.5, 0.0, 1.5, -3.0, 1.0, 2.0])                    # minus each label's mean (1.5, 2)
    z = c / 1.5                                                            # over mean |c|
    p = torch.sigmoid(ifn.selector.logits(x))
    want = torch.autograd.grad(-(z * p).mean() + KEEP_PENALTY * (p.mean() - 0.3) ** 2, ifn.params)
    out = ifn.step(1, ifn.selector.logits(x), 0.0, None, None, influence=infl, labels=y)
    for q, g in zip(ifn.params, want):
        torch.testing.assert_close(q.grad, g, rtol=1e-5, atol=1e-8)
    assert out == {"influence_pos_frac": pytest.approx(3 / 6), "influence_keep": 0.3}   # of the centred values


def test_bernoulli_reinforce_step_by_hand():
    """One bernoulli-mode step (update_every=1) moves the selector by Eq. 9 on the actions'
    log-likelihood: theta += alpha * r * grad sum_i [a_i log p_i + (1 - a_i) log(1 - p_i)] / B_s."""
    from cctl_rec.config import SelectorConfig
    from cctl_rec.train.ifn import IFN

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    a = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    for r in (0.4, -0.9):
        torch.manual_seed(0)
        ifn = IFN(SelectorConfig(mode="bernoulli", hidden=(4,), alpha=0.5, update_every=1, ema_baseline=0.0,
                                 reward_norm=False), 3)
        theta0 = [q.detach().clone() for q in ifn.params]
        p = torch.sigmoid(ifn.selector.logits(x))
        want = torch.autograd.grad((a * torch.log(p) + (1 - a) * torch.log(1 - p)).sum(), ifn.params)
        ifn.step(1, ifn.selector.logits(x), r, a, None)
        for q, q0, g in zip(ifn.params, theta0, want):
            torch.testing.assert_close(q.detach() - q0, 0.5 * r * g / 8, rtol=1e-4, atol=1e-7)


def test_select_gives_detached_weights_and_no_gradient_to_its_input():
    """IFN.select: paper mode weighs row i by p_i (alpha > 0) or 1 (alpha = 0); bernoulli mode by
    its 0/1 actions (alpha > 0) or 1. The weights carry no graph, and the logits none back into
    the SAN representation they read."""
    from cctl_rec.config import SelectorConfig
    from cctl_rec.train.ifn import IFN

    x = torch.randn(5, 3, requires_grad=True)
    for mode, alpha in [("paper", 1.0), ("paper", 0.0), ("bernoulli", 1.0), ("bernoulli", 0.0)]:
        torch.manual_seed(0)
        ifn = IFN(SelectorConfig(mode=mode, hidden=(4,), alpha=alpha, init_p=0.7), 3)
        sel = ifn.select(x, None)
        assert not sel.weights.requires_grad and sel.logits.requires_grad
        (gx,) = torch.autograd.grad(sel.logits.sum(), x, allow_unused=True)
        assert gx is None
        torch.testing.assert_close(sel.p, torch.sigmoid(sel.logits))
        if alpha == 0:
            assert torch.equal(sel.weights, torch.ones(5)) and sel.actions is None
        elif mode == "paper":
            torch.testing.assert_close(sel.weights, sel.p.detach())
        else:
            assert sel.actions is not None and torch.equal(sel.weights, sel.actions)
            assert set(sel.weights.tolist()) <= {0.0, 1.0}


def test_selector_refuses_init_p_at_either_end():
    """init_p = 0 or 1 would put the output bias at -inf / +inf: refused with the value named."""
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"selector init_p must be in \\(0, 1\\), got {bad}"):
            Selector(4, (2,), init_p=bad)


# ----------------------------------------------------------------------------- the full mutation pass
# (scripts/mutate.py over the critical files, 2026-12-03: each test below kills mutants that passed
# every test before it; docs/testing.md names them)


def test_scn_losses_default_reduction_is_each_domains_mean():
    """Without ``reduction``, each domain's loss is its sum over its own row count (2 target rows,
    3 source rows): the explicit "mean", not the sum."""
    out, b, w = _toy()
    d = scn_losses(out, b, w)
    assert float(d.tgt) == pytest.approx((_bce(0.5, 1) + _bce(-1.0, 0)) / 2, rel=1e-6)
    assert float(d.src) == pytest.approx((0.9 * _bce(2.0, 1) + 0.2 * _bce(-0.5, 1) + 0.5 * _bce(0.1, 0)) / 3,
                                         rel=1e-6)
    assert float(d.pure) == pytest.approx((_bce(0.2, 1) + _bce(-0.3, 0)) / 2, rel=1e-6)


def test_scn_losses_target_weight_scales_loss_tgt_in_loss_mixed():
    """Loss_mixed = Loss_src + tgt_weight * Loss_tgt: 0 is finetune's source-only phase, and any
    other weight scales the target term; the logged Loss_tgt and the reward stay unweighted."""
    out, b, w = _toy()
    base = scn_losses(out, b, w)
    for tw in (0.0, 0.5, 2.0):
        d = scn_losses(out, b, w, tgt_weight=tw)
        assert float(d.mixed) == pytest.approx(float(base.src) + tw * float(base.tgt), rel=1e-6), tw
        assert float(d.tgt) == float(base.tgt) and float(d.reward) == float(base.reward)


def test_logged_ren_cosines_carry_no_graph_while_loss_ren_does():
    """Both REN lookups with graph: Loss_ren keeps it (it trains the tables), the logged id and
    sequence cosines are detached."""
    out, b, w = _with_ren_and_domain()
    out.ren_seq_s = out.ren_seq_s.clone().requires_grad_(True)
    d = scn_losses(out, b, w, ren_weight=0.5)
    assert d.ren.requires_grad
    assert not d.cos_id.requires_grad and not d.cos_seq.requires_grad


def test_selector_init_p_scales_the_default_output_weights_by_a_hundredth():
    """init_p != 0.5: the hidden layers keep their default initialisation, the output unit's
    weights are exactly 0.01 x theirs and its bias is logit(init_p)."""
    from cctl_rec.modules.tower import mlp

    torch.manual_seed(0)
    sel = Selector(5, (4,), init_p=0.9)
    torch.manual_seed(0)
    ref = mlp(5, (4,), 1)
    torch.testing.assert_close(sel.net[0].weight, ref[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(sel.net[-1].weight, 0.01 * ref[-1].weight, rtol=0, atol=0)
    assert float(sel.net[-1].bias.detach()) == pytest.approx(math.log(0.9 / 0.1), rel=1e-6)


def test_influence_mode_with_groups_trains_on_each_items_mean():
    """selector.influence_group=item_id: one influence step follows -mean(zbar p) + 10 (mean p - keep)^2
    with zbar_i the mean normalised influence of the rows sharing row i's item (a fresh table: this
    step's rows only)."""
    from cctl_rec.config import SelectorConfig
    from cctl_rec.schema import synthetic_schemas
    from cctl_rec.train.ifn import IFN, KEEP_PENALTY

    src = synthetic_schemas(100, 50, 5, 7)["src"]
    torch.manual_seed(0)
    ifn = IFN(SelectorConfig(mode="influence", hidden=(4,), influence_group="item_id", influence_keep=0.3, lr=1e-2,
                             influence_norm="scale"), 3, source=src)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    infl = torch.tensor([1.0, 3.0, -2.0, 0.0])            # mean |influence| 1.5: z = 2/3, 2, -4/3, 0
    zbar = torch.tensor([4 / 3, 4 / 3, -2 / 3, -2 / 3])   # items 3, 3, 7, 7
    p = torch.sigmoid(ifn.selector.logits(x))
    want = torch.autograd.grad(-(zbar * p).mean() + KEEP_PENALTY * (p.mean() - 0.3) ** 2, ifn.params)
    ifn.step(1, ifn.selector.logits(x), 0.0, None, None, influence=infl, labels=torch.tensor([1.0, 0.0, 1.0, 0.0]),
             group_ids=torch.tensor([3, 3, 7, 7]))
    for q, g in zip(ifn.params, want):
        torch.testing.assert_close(q.grad, g, rtol=1e-5, atol=1e-8)


def test_dann_weight_without_a_domain_output_adds_nothing():
    """The DANN term needs the forward's domain logits: a model without a domain classifier gets
    Loss_mixed = Loss_src + Loss_tgt whatever dann_weight says."""
    out, b, w = _toy()                                   # no logit_domain
    assert out.logit_domain is None
    assert float(scn_losses(out, b, w, dann_weight=0.5).mixed) == float(scn_losses(out, b, w).mixed)


def test_influence_of_a_head_that_wraps_an_mlp_goes_through_its_own_forward():
    """Only the plain Tower takes the one-backward MLP path: a head holding an MLP as ``net`` but
    computing more on top (here a temperature, logit = net(x) / 2) is scored through its own
    forward (double backward), equal to the loop over samples."""
    from cctl_rec.modules.tower import mlp
    from cctl_rec.train.ifn import _mlp_sequence, per_sample_influence

    class Tempered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(6, (5,), 1)

        def forward(self, x):
            return self.net(x).squeeze(-1) / 2.0

    torch.manual_seed(0)
    head = Tempered()
    assert _mlp_sequence(head) is None
    xs, ys = torch.randn(5, 6), torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    xe, ye = torch.randn(7, 6), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    got = per_sample_influence(head, xs, ys, xe, ye)
    params = [p for n, p in head.named_parameters() if n != "net.2.bias"]      # the output bias left out
    ge = torch.autograd.grad(F.binary_cross_entropy_with_logits(head(xe), ye), params)
    want = [sum((a * b).sum() for a, b in zip(torch.autograd.grad(
        F.binary_cross_entropy_with_logits(head(xs[i:i + 1]), ys[i:i + 1]), params), ge)) for i in range(5)]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-7)
