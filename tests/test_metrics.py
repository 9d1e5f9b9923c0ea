"""Target metrics per user group: equal to the metric on the group's rows, None (never 0.0)
where a group has one label class or no rows, and reduced across ranks like the overall one."""

import pytest
import torch

from cctl_rec.metrics import BinaryMetrics, GroupMetrics


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
