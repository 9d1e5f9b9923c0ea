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
    with torch.no_grad():
        for q in sel.parameters():
            q.fill_(100.0)
    p = sel(torch.ones(5, 2))
    assert torch.all(p <= torch.sigmoid(torch.tensor(3.0)) + 1e-7)


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
