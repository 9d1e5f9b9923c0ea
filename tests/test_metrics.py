"""Target metrics per user group: equal to the metric on the group's rows, None (never 0.0)
where a group has one label class or no rows, and reduced across ranks like the overall one."""

import math

import pytest
import torch

from cctl_rec.metrics import BinaryMetrics, GroupMetrics, UserAUC, WindowMetrics


def _data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(2 * z)).float()
    groups = (torch.rand(n, generator=g) < 0.3).long()
    return z, y, groups


def _whole(z, y):
    m = BinaryMetrics()
    m.update(z, y)
    return m.compute()


def test_group_metrics_equal_the_metric_on_the_group_rows():
    z, y, g = _data()
    gm = GroupMetrics()
    for lo in range(0, 400, 64):  # batches
        gm.update(z[lo:lo + 64], y[lo:lo + 64], g[lo:lo + 64])
    out = gm.compute()
    for code, name in enumerate(("warm", "cold")):
        want = _whole(z[g == code], y[g == code])
        assert out[name]["rows"] == int((g == code).sum())
        assert out[name]["auc"] == pytest.approx(want["auc"]) and out[name]["logloss"] == pytest.approx(want["logloss"])


def test_a_group_with_one_label_class_or_no_rows_has_no_auc():
    z = torch.tensor([0.3, -1.0, 2.0, 0.1])
    gm = GroupMetrics()
    gm.update(z, torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([1, 1, 0, 0]))  # cold: positives only
    gm.update(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long))  # an empty batch is fine
    out = gm.compute()
    assert out["cold"]["auc"] is None and out["cold"]["rows"] == 2 and out["cold"]["logloss"] > 0
    assert out["warm"]["auc"] == 1.0
    only_warm = GroupMetrics()
    only_warm.update(z, torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long))
    assert only_warm.compute()["cold"] == {"auc": None, "logloss": None, "rows": 0}


def _two_ranks(rank, world):
    z, y, g = _data(seed=1)
    half = slice(0, 200) if rank == 0 else slice(200, 400)
    gz, gy, gg = z[half], y[half], g[half]
    if rank == 1:
        gg = torch.zeros_like(gg)  # rank 1 holds no cold row at all
    gm = GroupMetrics()
    gm.update(gz, gy, gg)
    return gm.compute()


@pytest.mark.dist
def test_group_metrics_reduce_across_ranks():
    from tests.dist_harness import run_distributed

    a, b = run_distributed(_two_ranks, 2)
    assert a == b
    z, y, g = _data(seed=1)
    g = g.clone()
    g[200:] = 0
    for code, name in enumerate(("warm", "cold")):
        want = _whole(z[g == code], y[g == code])
        assert a[name]["rows"] == int((g == code).sum())
        assert a[name]["auc"] == pytest.approx(want["auc"], abs=1e-6)
        assert a[name]["logloss"] == pytest.approx(want["logloss"], abs=1e-6)


# --- NE, calibration, CTR (torchrec.metrics) and GAUC, each against its definition by hand -------------

def _by_hand_auc(p, y):
    """Mann-Whitney AUC with ties counted 1/2."""
    pos, neg = p[y == 1], p[y == 0]
    return float(((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean())


def test_ne_calibration_ctr_equal_their_definitions():
    z, y, _ = _data(n=1000, seed=3)
    m = BinaryMetrics()
    for lo in range(0, 1000, 96):
        m.update(z[lo:lo + 96], y[lo:lo + 96])
    out = m.compute()
    p, ctr = torch.sigmoid(z).double(), float(y.mean())
    logloss = float(torch.nn.functional.binary_cross_entropy(p, y.double()))
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert out["ctr"] == pytest.approx(ctr)
    assert out["ne"] == pytest.approx(logloss / entropy, rel=1e-5)
    assert out["calibration"] == pytest.approx(float(p.sum() / y.sum()), rel=1e-5)
    assert out["auc"] == pytest.approx(_by_hand_auc(p, y), abs=1e-6)


def test_one_label_class_leaves_ne_and_calibration_undefined():
    m = BinaryMetrics()
    m.update(torch.tensor([0.2, -0.4]), torch.zeros(2))
    out = m.compute()
    assert out["auc"] is None and out["ne"] is None and out["calibration"] is None and out["ctr"] == 0.0
    empty = BinaryMetrics().compute()
    assert empty == {"auc": None, "logloss": None, "ne": None, "calibration": None, "ctr": None}


def test_tied_scores_keep_the_exact_auc():
    """Four rows all scored 0.5, labels 0, 1, 0, 1: every positive-negative pair tied, AUC 0.5.
    torchrec 1.8's own AUCMetric says 0.25 (ties ranked in argsort order): the day it says 0.5, the
    first assert fails and ExactAUCMetric can go."""
    from torchrec.metrics.auc import AUCMetric

    from cctl_rec.metrics import _TASK

    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    theirs = AUCMetric(world_size=1, my_rank=0, batch_size=4, tasks=[_TASK])
    theirs.update(predictions={"tgt": torch.full((4,), 0.5)}, labels={"tgt": y}, weights={"tgt": torch.ones(4)})
    assert float(theirs.compute()["auc-tgt|window_auc"]) == 0.25
    m = BinaryMetrics()
    m.update(torch.zeros(4), y)
    assert m.compute()["auc"] == 0.5


def test_four_rows_by_hand():
    """p = 0.8, 0.4, 0.6, 0.6 with labels 1, 0, 0, 1 (logits log(p / (1 - p))), users a, a, b, b (+ c):
    CTR = 2/4 = 0.5; calibration = (0.8 + 0.4 + 0.6 + 0.6) / 2 = 1.2;
    logloss = -(ln 0.8 + ln 0.6 + ln 0.4 + ln 0.6) / 4 = 2.161086 / 4 = 0.540272;
    NE = logloss / entropy(0.5) = 0.540272 / ln 2 = 0.779447;
    AUC: pairs (0.8, 0.4) 1, (0.8, 0.6) 1, (0.6, 0.4) 1, (0.6, 0.6) 1/2 -> 3.5 / 4 = 0.875;
    GAUC: user a (0.8 vs 0.4) 1.0, user b (0.6 vs 0.6, one tie) has equal scores and is left out, user c
    (0.3 and 0.2, negatives only) too -> 1.0 over 1 user; with b's negative scored 0.7 instead, b's
    AUC is 0 -> (1 + 0) / 2 = 0.5 over 2 users."""
    p = torch.tensor([0.8, 0.4, 0.6, 0.6, 0.3, 0.2], dtype=torch.float64)
    z, y = torch.log(p / (1 - p)).float(), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    m = BinaryMetrics()
    m.update(z[:4], y[:4])
    got = m.compute()
    assert got["ctr"] == 0.5
    assert got["calibration"] == pytest.approx(1.2, rel=1e-6)
    assert got["logloss"] == pytest.approx(0.540272, abs=1e-6)
    assert got["ne"] == pytest.approx(0.779447, abs=1e-6)
    assert got["auc"] == 0.875
    w = WindowMetrics()  # the training window: the same numbers under train_ keys
    w.update(z[:2], y[:2])
    w.update(z[2:4], y[2:4])
    assert w.compute() == pytest.approx({"train_" + k: v for k, v in got.items()}, rel=1e-6)
    u = UserAUC()
    u.update(z, y, torch.tensor([1, 1, 2, 2, 3, 3]))
    assert u.compute() == {"gauc": 1.0, "gauc_users": 1}
    u = UserAUC()
    u.update(z.clone().index_fill_(0, torch.tensor([2]), math.log(0.7 / 0.3)), y, torch.tensor([1, 1, 2, 2, 3, 3]))
    assert u.compute() == {"gauc": 0.5, "gauc_users": 2}


@pytest.mark.parametrize("chunk", [1 << 22, 7])  # one chunk; chunks of a few users each
def test_gauc_is_the_mean_auc_over_users_with_both_labels(chunk):
    z, y, _ = _data(n=600, seed=5)
    users = torch.randint(0, 40, (600,), generator=torch.Generator().manual_seed(5))
    users[:5], y[:5] = 99, 1.0  # user 99: positives only, not counted
    u = UserAUC(chunk=chunk)
    for lo in range(0, 600, 64):  # a user's rows spread over batches
        u.update(z[lo:lo + 64], y[lo:lo + 64], users[lo:lo + 64])
    out = u.compute()
    p = torch.sigmoid(z)
    aucs = [_by_hand_auc(p[users == k], y[users == k]) for k in users.unique().tolist()
            if 0 < y[users == k].sum() < (users == k).sum()]
    assert out["gauc_users"] == len(aucs)
    assert out["gauc"] == pytest.approx(sum(aucs) / len(aucs), abs=1e-6)


def test_gauc_without_a_user_of_both_labels_is_none():
    u = UserAUC()
    u.update(torch.tensor([0.1, 0.5]), torch.tensor([1.0, 0.0]), torch.tensor([1, 2]))
    assert u.compute() == {"gauc": None, "gauc_users": 0}
    with pytest.raises(ValueError, match="one user id per row: 1 ids for 2 rows"):
        u.update(torch.zeros(2), torch.zeros(2), torch.zeros(1, dtype=torch.long))


def _two_ranks_ctr(rank, world):
    z, y, _ = _data(n=400, seed=7)
    users = torch.arange(400) % 13  # every user on both ranks
    half = slice(0, 150) if rank == 0 else slice(150, 400)
    m, u = BinaryMetrics(), UserAUC()
    m.update(z[half], y[half])
    u.update(z[half], y[half], users[half])
    return {**m.compute(), **u.compute()}


@pytest.mark.dist
def test_ctr_metrics_reduce_across_ranks():
    from tests.dist_harness import run_distributed

    a, b = run_distributed(_two_ranks_ctr, 2)
    assert a == b
    z, y, _ = _data(n=400, seed=7)
    m, u = BinaryMetrics(), UserAUC()
    m.update(z, y)
    u.update(z, y, torch.arange(400) % 13)
    want = {**m.compute(), **u.compute()}
    assert a.keys() == want.keys()
    for k, v in want.items():
        assert a[k] == pytest.approx(v, rel=1e-6), k


def test_window_metrics_score_each_window_alone():
    from cctl_rec.metrics import WindowMetrics

    z, y, _ = _data(n=512, seed=11)
    w = WindowMetrics()
    for lo in range(0, 256, 64):  # window 1: rows 0..255
        w.update(z[lo:lo + 64], y[lo:lo + 64])
    first = w.compute()
    for lo in range(256, 512, 64):  # window 2: rows 256..511 only
        w.update(z[lo:lo + 64], y[lo:lo + 64])
    second = w.compute()
    for got, rows in ((first, slice(0, 256)), (second, slice(256, 512))):
        want = _whole(z[rows], y[rows])  # the metric objects on the same rows
        assert got.keys() == {f"train_{k}" for k in want}
        for k, v in want.items():
            assert got[f"train_{k}"] == pytest.approx(v, rel=1e-5), k
    assert set(first) == {"train_auc", "train_logloss", "train_ne", "train_calibration", "train_ctr"}
    one_class = WindowMetrics()
    one_class.update(z[:4], torch.zeros(4))
    assert one_class.compute() | {"train_logloss": 0} == {"train_auc": None, "train_logloss": 0, "train_ne": None,
                                                          "train_calibration": None, "train_ctr": 0.0}
    assert all(v is None for v in WindowMetrics().compute().values())


def test_window_metrics_carried_by_a_checkpoint_give_the_same_numbers_bitwise():
    """A kill between two log lines: the window's rows go into the checkpoint (:meth:`state`) and the
    resumed run's log line equals the uninterrupted one's bit for bit (and the next window too)."""
    z, y, _ = _data(n=640, seed=12)
    full = WindowMetrics()
    for lo in range(0, 320, 64):
        full.update(z[lo:lo + 64], y[lo:lo + 64])
    cut = WindowMetrics()
    for lo in range(0, 192, 64):  # killed after 3 of the window's 5 steps
        cut.update(z[lo:lo + 64], y[lo:lo + 64])
    resumed = WindowMetrics.restore(cut.state())
    for lo in range(192, 320, 64):
        resumed.update(z[lo:lo + 64], y[lo:lo + 64])
    assert resumed.compute() == full.compute()
    for w in (full, resumed):  # the next window: its own rows only
        for lo in range(320, 640, 64):
            w.update(z[lo:lo + 64], y[lo:lo + 64])
    assert resumed.compute() == full.compute() == pytest.approx(
        {"train_" + k: v for k, v in _whole(z[320:], y[320:]).items()}, rel=1e-5)
    assert WindowMetrics().state() is None and all(v is None for v in WindowMetrics.restore(None).compute().values())


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                "broadcast_object_list", "barrier", "reduce_scatter", "gather", "scatter")


def _count_collectives():
    """Wraps torch.distributed's collectives in this process; returns the {name: calls} dict they fill."""
    import torch.distributed as dist

    calls = {}
    for name in _COLLECTIVES:
        orig = getattr(dist, name)

        def counted(*a, _orig=orig, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _orig(*a, **k)
        setattr(dist, name, counted)
    return calls


def _two_ranks_window(rank, world):
    """Each rank trains 2 windows of 4 steps x 32 rows on its own rows; collectives counted."""
    z, y, _ = _data(n=512, seed=13)
    calls = _count_collectives()
    w = WindowMetrics()  # building it is counted too
    out, during_updates, per_compute = [], [], []
    for win in range(2):
        for step in range(4):
            lo = (win * 4 + step) * 64 + rank * 32  # step rows: rank 0 the first 32, rank 1 the next 32
            w.update(z[lo:lo + 32], y[lo:lo + 32])
        during_updates.append(sum(calls.values()))
        out.append(w.compute())
        per_compute.append(sum(calls.values()) - during_updates[-1])
        calls.clear()
    return out, during_updates, per_compute


@pytest.mark.dist
def test_window_metrics_reduce_across_ranks_only_when_computed():
    """2 ranks == 1 rank over the union of both ranks' rows, window by window; no collective while
    steps are added (only compute(), i.e. once per log line, talks to the other rank)."""
    from tests.dist_harness import run_distributed

    (a, a_upd, a_cmp), (b, _, _) = run_distributed(_two_ranks_window, 2)
    assert a == b
    assert a_upd == [0, 0]  # no collective in 4 steps of update()
    assert a_cmp[0] == a_cmp[1] > 0
    z, y, _ = _data(n=512, seed=13)
    for win in range(2):
        rows = slice(win * 256, (win + 1) * 256)
        want = {"train_" + k: v for k, v in _whole(z[rows], y[rows]).items()}
        assert a[win] == pytest.approx(want, rel=1e-5), win
        assert a[win]["train_auc"] == _whole(z[rows], y[rows])["auc"]  # the same rows, the same exact AUC
    print(f"collectives per WindowMetrics.compute() on 2 ranks: {a_cmp[0]}")

