"""Direction tests: each component pushes the way the paper says, not the opposite way.

Every test here kills a one-line sign mutation of the equation code that passed the rest of the
suite (issue #17; docs/testing.md lists each mutation and the test that fails under it). They go
through the public entry points (IFN, scn_losses, sync_mixed_to_pure, the train command) on small
hand-built tensors, so a refactor of the internals keeps them.
"""

import inspect
import json

import pytest
import torch

from cctl_rec.config import SelectorConfig
from cctl_rec.modules.ren import ren_loss
from cctl_rec.train.ifn import IFN
from cctl_rec.train.losses import scn_losses
from tests.test_equations import _toy

IN_DIM = 6


def _paper_ifn(**kw) -> IFN:
    """A paper-mode IFN updating after every step, the reward passed through unshaped."""
    torch.manual_seed(0)
    cfg = dict(mode="paper", hidden=(8,), alpha=0.1, gamma=0.8, update_every=1, ema_baseline=0.0,
               reward_norm=False, causal_credit=False)
    return IFN(SelectorConfig(**{**cfg, **kw}), IN_DIM)


def _mean_p(ifn: IFN, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.sigmoid(ifn.selector.logits(x)).mean())


def _paper_step(ifn: IFN, x: torch.Tensor, reward: float, step: int = 1) -> dict:
    logits = ifn.selector.logits(x)
    return ifn.step(step, logits, reward=reward, actions=None, harmful=None)


@pytest.mark.parametrize("reward,direction", [(1.0, 1), (-1.0, -1)])
def test_paper_reinforce_positive_reward_raises_p_negative_lowers_it(reward, direction):
    """Eq. 9 ascends r * grad sum_i log p_i: a positive reward (the source helped the mixed
    network, Eq. 5) makes the selector keep more source rows, a negative one fewer."""
    x = torch.randn(32, IN_DIM, generator=torch.Generator().manual_seed(1))
    ifn = _paper_ifn()
    before = _mean_p(ifn, x)
    out = _paper_step(ifn, x, reward)
    assert out.get("selector_update") == 1.0  # update_every=1: this step applied the update
    after = _mean_p(ifn, x)
    assert direction * (after - before) > 1e-4, (reward, before, after)


def test_paper_reward_reaches_the_selector_with_its_sign():
    """One paper-mode IFN.step with reward r moves the selector by exactly Eq. 9 over a one-step
    window: theta += alpha * r * grad_theta(sum_i log p_i) / B_s. The reward's sign and scale
    arrive unchanged, and the gradient is that of log p (not of log(1 - p))."""
    x = torch.randn(16, IN_DIM, generator=torch.Generator().manual_seed(2))
    for r in (0.3, -0.7):
        ifn = _paper_ifn(alpha=0.5)
        theta0 = [q.detach().clone() for q in ifn.selector.parameters()]
        logits = ifn.selector.logits(x)
        want_grad = torch.autograd.grad(torch.log(torch.sigmoid(logits)).sum(), list(ifn.selector.parameters()))
        _paper_step(ifn, x, r)
        for q, q0, g in zip(ifn.selector.parameters(), theta0, want_grad):
            torch.testing.assert_close(q.detach() - q0, 0.5 * r * g / x.shape[0], rtol=1e-4, atol=1e-7)


def test_influence_mode_favours_rows_with_positive_influence():
    """The influence objective maximises sum_i z_i p_i: rows whose step would lower the target
    loss (positive influence) gain p, rows that would raise it lose p."""
    torch.manual_seed(0)
    ifn = IFN(SelectorConfig(mode="influence", hidden=(8,), influence_group="", influence_keep=0.0, lr=1e-2), IN_DIM)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, IN_DIM, generator=g)
    labels = (torch.rand(64, generator=g) < 0.5).float()
    good = torch.arange(64) % 2 == 0                       # alternate rows, both labels on each side
    influence = torch.where(good, 1.0, -1.0) * (1 + torch.rand(64, generator=g))
    with torch.no_grad():
        p0 = torch.sigmoid(ifn.selector.logits(x))
    for step in range(1, 21):
        ifn.step(step, ifn.selector.logits(x), 0.0, None, None, influence=influence, labels=labels)
    with torch.no_grad():
        dp = torch.sigmoid(ifn.selector.logits(x)) - p0
    assert float(dp[good].mean()) > 0.01 > -0.01 > float(dp[~good].mean()), (dp[good].mean(), dp[~good].mean())


def test_loss_mixed_adds_lambda_times_loss_ren():
    """Eq. 3 with REN: Loss_mixed = Loss_src + Loss_tgt + lambda * Loss_ren, so minimising the
    mixed loss minimises Loss_ren (the two domains' id embeddings pushed apart, their behaviour
    sequences pulled together, Eq. 12), never the opposite."""
    out, b, w = _toy()
    # 2 users + 2 items (B_t = 2) and 2 sequences; Loss_ren of these is cos_id - cos_seq != 0
    out.ren_id_s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.5, -1.0]], requires_grad=True)
    out.ren_id_t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    out.ren_seq_s = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    out.ren_seq_t = torch.tensor([[2.0, 4.0], [1.0, 1.0]])
    b.seq_mask = torch.tensor([True, True])
    b.item_in_other = torch.tensor([True, False])
    ren = float(ren_loss(out.ren_id_s.detach(), out.ren_id_t, torch.cat([b.user_in_other, b.item_in_other]),
                         out.ren_seq_s, out.ren_seq_t, b.seq_mask)[0])
    assert abs(ren) > 0.05
    lam = 0.3
    base = scn_losses(out, b, w, "mean", ren_weight=0.0)
    with_ren = scn_losses(out, b, w, "mean", ren_weight=lam)
    assert float(with_ren.ren.detach()) == pytest.approx(ren, abs=1e-6)
    assert float((with_ren.mixed - base.mixed).detach()) == pytest.approx(lam * ren, abs=1e-6)
    # and the gradient through the mixed loss is lambda times REN's own
    (g_mixed,) = torch.autograd.grad(with_ren.mixed, out.ren_id_s, retain_graph=True)
    (g_ren,) = torch.autograd.grad(with_ren.ren, out.ren_id_s)
    torch.testing.assert_close(g_mixed, lam * g_ren)


def test_sync_copies_the_dense_adam_moments():
    """After sync_mixed_to_pure(optimizer_state=True) the pure tower's Adam state is the mixed
    tower's, so with the same gradients both towers take the same next step."""
    from cctl_rec.config import ModelConfig
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.schema import synthetic_schemas
    from cctl_rec.train.sync import sync_mixed_to_pure

    torch.manual_seed(0)
    m = CCTL(synthetic_schemas(30, 20, 3, 5, n_cities=4), ModelConfig(tower=(8, 4), san_hidden=(4,)),
             device=torch.device("cpu"))
    mixed, pure = list(m.mixed_tower.parameters()), list(m.pure_tower.parameters())
    opt = torch.optim.Adam(mixed + pure, lr=0.1)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):  # different gradients: the two towers' moments drift apart
        for q in mixed + pure:
            q.grad = torch.randn(q.shape, generator=g)
        opt.step()
    assert not torch.equal(opt.state[mixed[0]]["exp_avg"], opt.state[pure[0]]["exp_avg"])
    sync_mixed_to_pure(m, opt, optimizer_state=True)
    for qm, qp in zip(mixed, pure):
        assert torch.equal(qm, qp)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt.state[qp][k]), torch.as_tensor(opt.state[qm][k])), k
    for qm, qp in zip(mixed, pure):  # same gradient from here: the towers stay equal
        qm.grad = torch.randn(qm.shape, generator=g)
        qp.grad = qm.grad.clone()
    opt.step()
    for qm, qp in zip(mixed, pure):
        torch.testing.assert_close(qp, qm, rtol=0, atol=0)


def _cctl_with_drifted_adam(seed: int = 0, n_users: int = 30):
    from cctl_rec.config import ModelConfig
    from cctl_rec.models.cctl import CCTL
    from cctl_rec.schema import synthetic_schemas

    torch.manual_seed(seed)
    m = CCTL(synthetic_schemas(n_users, 20, 3, 5, n_cities=4), ModelConfig(tower=(8, 4), san_hidden=(4,)),
             device=torch.device("cpu"))
    mixed, pure = list(m.mixed_tower.parameters()), list(m.pure_tower.parameters())
    opt = torch.optim.Adam(mixed + pure, lr=0.1)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        for q in mixed + pure:
            q.grad = torch.randn(q.shape, generator=g)
        opt.step()
    return m, opt, mixed, pure


def test_sync_default_copies_the_optimizer_state_and_the_tables_and_checks_their_layout():
    """sync_mixed_to_pure(module, opt) copies the tables, the towers and (by default) the dense Adam
    moments; optimizer_state=False copies the weights only; a pure table set shaped unlike the mixed
    one is refused at the first sync, before anything is copied."""
    from cctl_rec.train.sync import sync_mixed_to_pure

    m, opt, mixed, pure = _cctl_with_drifted_adam()
    with torch.no_grad():
        for t in m.mixed_tgt.parameters():
            t.add_(1.0)
    kept = {id(qp): opt.state[qp]["exp_avg"].clone() for qp in pure}
    sync_mixed_to_pure(m, opt, optimizer_state=False)
    for qm, qp in zip(mixed, pure):
        assert torch.equal(qm, qp) and torch.equal(opt.state[qp]["exp_avg"], kept[id(qp)])
    for k, v in m.mixed_tgt.state_dict().items():
        assert torch.equal(m.pure_tgt.state_dict()[k], v), k
    sync_mixed_to_pure(m, opt)
    for qm, qp in zip(mixed, pure):
        assert torch.equal(opt.state[qp]["exp_avg"], opt.state[qm]["exp_avg"])
        assert opt.state[qp]["exp_avg"] is not opt.state[qm]["exp_avg"]   # a copy: each tower steps its own

    m2, opt2, _, _ = _cctl_with_drifted_adam(seed=1)
    other, _, _, _ = _cctl_with_drifted_adam(seed=2, n_users=31)   # one more user row in each table
    m2.pure_tgt = other.pure_tgt
    before = {k: v.clone() for k, v in m2.pure_tgt.state_dict().items()}
    with pytest.raises(RuntimeError, match="sharded differently"):
        sync_mixed_to_pure(m2, opt2)
    for k, v in m2.pure_tgt.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow  # a 6-step training run: ~6 s on one core
def test_train_hands_the_selector_loss_pure_minus_loss_tgt(tiny_data, tmp_path, monkeypatch):
    """The reward the training loop gives the selector at each step is Eq. 5 of that step,
    Loss_pure - Loss_tgt, with its sign (compared with the losses logged every step)."""
    from cctl_rec.cli import main
    from tests.test_train import SMALL

    received = []
    orig = IFN.step
    sig = inspect.signature(orig)

    def spy(self, *a, **k):
        received.append(float(sig.bind(self, *a, **k).arguments["reward"]))
        return orig(self, *a, **k)

    monkeypatch.setattr(IFN, "step", spy)
    run = tmp_path / "run"
    assert main(["train", "--data", tiny_data, "--run-dir", str(run), *SMALL, "run.steps=6", "run.log_every=1",
                 "scn.sync_every=100", "selector.update_every=3"]) == 0
    hist = json.loads((run / "metrics.json").read_text())["history"]
    want = [h["loss_pure"] - h["loss_tgt"] for h in hist]
    assert len(received) == len(want) == 6
    assert max(abs(w) for w in want) > 1e-4  # the towers have drifted apart: a reward with a sign
    assert received == pytest.approx(want, abs=1e-6)
