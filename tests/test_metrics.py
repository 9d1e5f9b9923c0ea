"""Target metrics per user group: equal to the metric on the group's rows, None (never 0.0)
where a group has one label class or no rows, and reduced across ranks like the overall one."""

import math

import pytest
import torch

from cctl_rec.metrics import BinaryMetrics, GroupMetrics, UserAUC


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
    m = BinaryMetrics()  # torchrec 1.8's AUCMetric says 0.25 here (argsort order); the metric is 0.5
    m.update(torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert m.compute()["auc"] == 0.5


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
