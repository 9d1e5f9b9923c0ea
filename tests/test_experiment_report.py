"""The experiment report's cross-dataset summary pinned by hand: paired deltas against the reference,
and average ranks in which a model identical to another shares its place."""

from cctl_rec.experiment.report import cross_dataset, fractional_ranks
from cctl_rec.experiment.spec import load_spec


def test_fractional_ranks_share_tied_places():
    assert fractional_ranks({"a": 0.7, "b": 0.7, "c": 0.6}) == {"a": 1.5, "b": 1.5, "c": 3.0}
    assert fractional_ranks({"a": 0.1, "b": 0.2, "c": 0.2, "d": 0.2}) == {"b": 2.0, "c": 2.0, "d": 2.0, "a": 4.0}
    assert fractional_ranks({"x": 0.5}) == {"x": 1.0}


def _row(seeds, auc):
    return {"seeds": seeds, "auc": auc}


def test_cross_dataset_pairs_by_seed_and_ties_rank_together(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("name: t\nseeds: [0, 1]\ncompare: [Mix]\ndatasets:\n  d1: {path: x}\n  d2: {path: y}\n"
                   "models:\n  - {name: Mix, config: configs/cctl_tiny.yaml}\n"
                   "  - {name: CCTL, config: configs/cctl_tiny.yaml}\n  - {name: DNN, config: configs/cctl_tiny.yaml}\n")
    spec = load_spec(str(cfg))
    summary = {
        # d1: CCTL is Mix exactly (tie at 1.5), the DNN last
        "d1": {"models": {"Mix": _row([0, 1], [0.70, 0.72]), "CCTL": _row([0, 1], [0.70, 0.72]),
                          "DNN": _row([0, 1], [0.60, 0.62])}},
        # d2: CCTL ahead of Mix by 0.02 on seed 0 and behind by 0.01 on seed 1; the DNN first
        "d2": {"models": {"Mix": _row([0, 1], [0.50, 0.52]), "CCTL": _row([1, 0], [0.51, 0.52]),
                          "DNN": _row([0, 1], [0.80, 0.80])}},
    }
    xd = cross_dataset(spec, summary)
    assert xd["CCTL"]["ranks"] == [1.5, 2.0] and xd["Mix"]["ranks"] == [1.5, 3.0] and xd["DNN"]["ranks"] == [3.0, 1.0]
    assert abs(xd["CCTL"]["avg_rank"] - 1.75) < 1e-12 and abs(xd["Mix"]["avg_rank"] - 2.25) < 1e-12
    # paired by seed: d1 0, d2 ((0.52 - 0.50) + (0.51 - 0.52)) / 2 = 0.005
    assert [round(d, 6) for d in xd["CCTL"]["deltas"]] == [0.0, 0.005]
    assert xd["CCTL"]["wins"] == 1 and xd["CCTL"]["pairs"] == 4 and xd["CCTL"]["datasets_ahead"] == 1
    assert xd["CCTL"]["datasets_behind"] == 0 and xd["DNN"]["datasets_behind"] == 1
