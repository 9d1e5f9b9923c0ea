"""The product's selector pieces (issue 16): the evidence selector's label-shift weights and group
table pinned against hand computation, init_p, the derived cadence, alpha = 0 as plain mixing."""

import math

import pytest
import torch

from cctl_rec.config import SelectorConfig
from cctl_rec.modules.selector import Selector
from cctl_rec.train.evidence import EvidenceTable, LabelShift
from cctl_rec.train.ifn import IFN, update_every_for


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_label_shift_lowers_only_the_label_the_source_over_represents():
    ls = LabelShift()
    assert ls.weights(t(0, 1)).tolist() == [1.0, 1.0]          # nothing seen: plain mixing
    ls.update(src_labels=t(1, 1, 1, 0), tgt_labels=t(1, 0, 0, 0))
    # P_s(1) = 3/4, P_t(1) = 1/4: r_1 = 1/3, r_0 = 3 -> w_0 = 1, w_1 = (1/3) / 3 = 1/9
    w0, w1 = ls.label_weights().tolist()
    assert w0 == 1.0 and w1 == pytest.approx(1 / 9)
    assert ls.weights(t(1, 0, 1)).tolist() == pytest.approx([1 / 9, 1.0, 1 / 9])
    same = LabelShift()
    same.update(t(1, 0, 0, 0, 0), t(0, 1, 0, 0, 0))           # the same click rate: every weight 1
    assert same.label_weights().tolist() == [1.0, 1.0]
    one_class = LabelShift()
    one_class.update(t(1, 1), t(1, 0))                          # the source has no negatives yet
    assert one_class.label_weights().tolist() == [1.0, 1.0]


def test_evidence_table_lowers_a_group_only_when_it_does_worse_than_target_rows_alike():
    ev = EvidenceTable([0.0], decay=0.0, t=2.0, strength=1.0)  # 2 bins per label: margin < 0, >= 0
    labels, margins = t(0, 0, 0, 0, 1, 1, 1, 1), t(-1, -1, 1, 1, -1, -1, 1, 1)
    g = ev.groups(labels, margins)
    assert g.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ev.weights(g).tolist() == [1.0] * 8                  # no evidence yet
    # source: group 0 clearly below zero, group 2 below zero but noisy, groups 1 and 3 above
    ev.update(g, t(-1.1, -0.9, 0.5, 0.7, -2.0, 1.0, 0.2, 0.4))
    # target rows alike: group 0 at -0.2, everything else at 0
    ev.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), t(-0.25, -0.15, 0, 0, 0, 0, 0, 0), reference=True)
    w = ev.group_weights()
    # group 0: mean -1.0 (se 0.1) vs target -0.2 (se 0.05): d = -0.8 < -2 * sqrt(0.0125): exp(-0.8)
    assert w[0].item() == pytest.approx(math.exp(-0.8))
    # group 2: mean -0.5 but se 1.5: not significant; groups 1 and 3: mean above zero
    assert w[1].item() == w[2].item() == w[3].item() == 1.0
    # compared with zero instead of the target rows, group 0 drops further
    ev0 = EvidenceTable([0.0], decay=0.0, t=2.0, strength=1.0, reference=False)
    ev0.update(g, t(-1.1, -0.9, 0.5, 0.7, -2.0, 1.0, 0.2, 0.4))
    assert ev0.group_weights()[0].item() == pytest.approx(math.exp(-1.0))


def test_evidence_table_report_by_hand():
    """The group table metrics.json reports: per (label, margin bin) the bin's margin range, the
    source rows' count, mean and se, the target rows' (the reference) and the weight."""
    ev = EvidenceTable([-1.0, 1.0], decay=0.0, t=2.0, strength=1.0)   # 3 bins per label
    g = ev.groups(t(0, 0, 1, 1), t(-2.0, -3.0, 0.0, 0.5))
    assert g.tolist() == [0, 0, 4, 4]
    ev.update(g, t(-1.1, -0.9, 0.5, 0.7))
    ev.update(torch.tensor([0, 0]), t(-0.25, -0.15), reference=True)
    inf, se = float("inf"), math.sqrt(0.01 / 2)   # two rows 0.1 from their mean: var 0.01, se sqrt(var / 2)
    want = [  # label, margin range, count, mean, se, target count, target mean, weight
        (0, -inf, -1.0, 2.0, -1.0, se, 2.0, -0.2, math.exp(-0.8)),  # d = -0.8 < -2 * sqrt(se^2 + 0.0354^2)
        (0, -1.0, 1.0, 0.0, 0.0, None, 0.0, -0.2, 1.0),  # no rows: the label's lowest target mean
        (0, 1.0, inf, 0.0, 0.0, None, 0.0, -0.2, 1.0),
        (1, -inf, -1.0, 0.0, 0.0, None, 0.0, 0.0, 1.0),  # no target row of label 1: 0
        (1, -1.0, 1.0, 2.0, 0.6, se, 0.0, 0.0, 1.0),     # mean above 0: never lowered
        (1, 1.0, inf, 0.0, 0.0, None, 0.0, 0.0, 1.0)]
    rows = ev.table()
    assert len(rows) == 6
    for row, (lab, lo, hi, n, mean, s, tn, tmean, w) in zip(rows, want):
        assert (row["label"], row["margin_lo"], row["margin_hi"], row["count"]) == (lab, lo, hi, n)
        assert row["mean"] == pytest.approx(mean, abs=1e-6) and row["target_count"] == tn
        assert (row["se"] is None) if s is None else row["se"] == pytest.approx(s, rel=1e-4)
        assert row["target_mean"] == pytest.approx(tmean, abs=1e-6) and row["weight"] == pytest.approx(w, rel=1e-6)


def test_evidence_table_decays_old_rows():
    ev = EvidenceTable([0.0], decay=0.5, t=0.0, strength=1.0)
    g = torch.tensor([0, 0])
    ev.update(g, t(-1.0, -1.0))
    ev.update(g, t(1.0, 1.0))    # sum = 0.5 * -2 + 2 = 1, count = 0.5 * 2 + 2 = 3
    mean, _ = ev.src.stats()
    assert mean[0].item() == pytest.approx(1 / 3)


def test_selector_starts_at_init_p_for_every_row():
    torch.manual_seed(0)
    s = Selector(12, (8,), logit_clamp=8.0, init_p=0.98)
    p = s(torch.randn(64, 12))
    assert torch.allclose(p, torch.full_like(p, 0.98), atol=2e-3)
    torch.manual_seed(0)
    half = Selector(12, (8,), init_p=0.5)                      # the old initialisation, unchanged
    torch.manual_seed(0)
    from cctl_rec.modules.tower import mlp
    ref = mlp(12, (8,), 1)
    torch.nn.init.constant_(ref[-1].bias, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(half.net.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ValueError, match="init_p must be in"):
        Selector(4, (2,), init_p=1.0)


@pytest.mark.parametrize("setting,total,want", [(1000, 100, 1000), (20, 5000, 20), (0, 100, 5), (0, 400, 20),
                                                 (0, 10, 1), (0, 1_000_000, 1000), (0, None, 1000)])
def test_update_every_from_the_run_length(setting, total, want):
    assert update_every_for(SelectorConfig(update_every=setting), total) == want


def test_alpha_zero_is_plain_mixing_and_evidence_starts_at_one():
    x = torch.randn(16, 6)
    paper = IFN(SelectorConfig(mode="paper", alpha=0.0), 6)
    w, _, _ = paper.weights(x, None)
    assert w.tolist() == [1.0] * 16
    ev = IFN(SelectorConfig(mode="evidence"), 6)
    w, _, _ = ev.weights(x, None, labels=torch.randint(0, 2, (16,)).float(), logit_src=torch.randn(16))
    assert w.tolist() == [1.0] * 16
    with pytest.raises(ValueError, match="evidence needs the source labels"):
        ev.weights(x, None)


def test_bad_selector_settings_are_refused():
    for kw, msg in [({"init_p": 0.0}, "init_p"), ({"update_every": -1}, "update_every"),
                    ({"evidence_bins": (1.0, 0.0)}, "evidence_bins"), ({"evidence_strength": 0.0}, "strength")]:
        with pytest.raises(ValueError, match=msg):
            SelectorConfig(**kw)


def test_label_shift_by_margin_drops_the_same_share_from_the_rows_the_network_disagrees_with():
    ls = LabelShift("margin")
    src = t(*([1] * 6 + [0] * 2))                 # P_s(1) = 3/4
    tgt = t(1, 0, 0, 0)                           # P_t(1) = 1/4: w_1 = 1/9, drop 8/9 of the label-1 rows
    margins = t(-3, -2, -1, 0.5, 1.5, 9, 0, 0)
    ls.update(src, tgt, margins)
    w = ls.weights(src, margins)
    # the label-1 rows below the 8/9 quantile of their margins (all but the largest) get 0
    assert w.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    half = LabelShift("label", power=0.5)
    half.update(src, tgt)
    assert half.label_weights().tolist() == pytest.approx([1.0, 1 / 3])


def test_label_shift_waits_for_a_significant_difference():
    ls = LabelShift(power=1.0, min_z=3.0)
    src, tgt = t(1, 1, 1, 0), t(1, 0, 0, 0)
    ls.update(src, tgt)
    # P_s(1) = 3/4, P_t(1) = 1/4 on 4 rows each: pooled 1/2, z = 0.5 / sqrt(1/4 * (1/4 + 1/4)) = sqrt(2)
    assert ls.z() == pytest.approx(math.sqrt(2))
    assert ls.label_weights().tolist() == [1.0, 1.0]
    for _ in range(4):
        ls.update(src, tgt)
    # 20 rows each: z = 0.5 / sqrt(1/4 * (1/20 + 1/20)) = sqrt(10) > 3: the shift applies
    assert ls.z() == pytest.approx(math.sqrt(10))
    assert ls.label_weights().tolist() == pytest.approx([1.0, 1 / 9])
    assert LabelShift().z() == 0.0
    with pytest.raises(ValueError, match="min_z"):
        LabelShift(min_z=-1.0)
    with pytest.raises(ValueError, match="evidence_shift_z"):
        SelectorConfig(evidence_shift_z=-0.5)


def test_evidence_without_a_significant_label_shift_trains_as_mix_bitwise(tiny_data, tmp_path):
    """The tiny domains click at the same rate up to sampling: the evidence selector keeps every
    weight at exactly 1 and trains Mix's network bit for bit; with the gate off (z = 0) the chance
    difference of the shares lowers a label and the run departs from Mix."""
    import json

    from cctl_rec.cli import main

    base = ["data.batch_size=128", "model.tower=[32,16]", "model.san_hidden=[16]", "run.max_eval_rows=512",
            "scn.sync_every=3", "run.steps=6", "run.threads=1"]
    out, p_logged = {}, {}
    for name, extra in [("mix", ["selector.mode=fixed"]), ("evidence", ["selector.mode=evidence"]),
                        ("ungated", ["selector.mode=evidence", "selector.evidence_shift_z=0"])]:
        run = tmp_path / name
        assert main(["train", "--data", tiny_data, "--run-dir", str(run), *base, *extra]) == 0
        m = json.loads((run / "metrics.json").read_text())
        out[name] = (m["target_test"], m["target_valid"])
        p_logged[name] = [h["p_mean"] for h in m["history"]]
    assert out["evidence"] == out["mix"]
    assert out["ungated"] != out["mix"]
    # the log's p: the evidence mode's weights (all 1 here), the other modes' selector p (untrained: ~init_p)
    assert p_logged["evidence"] and all(p == 1.0 for p in p_logged["evidence"])
    assert p_logged["mix"] and all(0.4 < p < 0.6 for p in p_logged["mix"])


@pytest.mark.parametrize("reference,want", [("target", math.exp(-0.8)), ("zero", math.exp(-1.0))])
def test_ifn_builds_the_evidence_table_its_settings_name(reference, want):
    """selector.evidence_groups=true in evidence mode: the IFN's group table has the configured
    bins, decay, t, strength and reference (the hand case above: a group at -1.0 against target rows
    alike at -0.2, or against zero)."""
    ifn = IFN(SelectorConfig(mode="evidence", evidence_groups=True, evidence_shift="none", evidence_bins=(0.0,),
                             evidence_decay=0.0, evidence_t=2.0, evidence_strength=1.0, evidence_reference=reference), 6)
    assert ifn.evidence is not None and ifn.label_shift is None
    labels, margins = t(0, 0, 0, 0, 1, 1, 1, 1), t(-1, -1, 1, 1, -1, -1, 1, 1)
    g = ifn.evidence.groups(labels, margins)
    ifn.evidence.update(g, t(-1.1, -0.9, 0.5, 0.7, -2.0, 1.0, 0.2, 0.4))
    ifn.evidence.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), t(-0.25, -0.15, 0, 0, 0, 0, 0, 0), reference=True)
    assert ifn.evidence.group_weights()[0].item() == pytest.approx(want)


def test_evidence_groups_bin_each_row_by_its_margin_under_its_label():
    """The IFN groups a source row by its label and its margin (2 y - 1) * logit: > 0 where the
    mixed network agrees with the label, by the same amount for either label."""
    cfg = SelectorConfig(mode="evidence", evidence_groups=True, evidence_shift="none", evidence_bins=(-1.0, 1.0))
    ifn = IFN(cfg, 6)
    labels, logits = t(1, 1, 0, 0, 0, 1), t(2.0, -2.0, 2.0, -2.0, 0.5, 0.5)
    # margins 2, -2, -2, 2, -0.5, 0.5 -> bins 2, 0, 0, 2, 1, 1 (of 3 per label), + 3 for label 1
    assert ifn.evidence_groups(labels, logits).tolist() == [5, 3, 0, 2, 1, 4]


def test_evidence_weights_are_the_label_shift_weight_times_the_group_weight():
    """evidence mode with both parts on: a row's weight is its label's shift weight (the hand case
    above: 1/9 for the over-represented positives, power 1, no gate) times its group's weight
    (exp(-0.8) for label 0 at a negative margin)."""
    cfg = SelectorConfig(mode="evidence", evidence_shift_z=0.0, evidence_shift_power=1.0, evidence_groups=True,
                         evidence_bins=(0.0,), evidence_decay=0.0, evidence_t=2.0, evidence_strength=1.0)
    ifn = IFN(cfg, 6)
    ifn.label_shift.update(t(1, 1, 1, 0), t(1, 0, 0, 0))
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ifn.evidence.update(g, t(-1.1, -0.9, 0.5, 0.7, -2.0, 1.0, 0.2, 0.4))
    ifn.evidence.update(g, t(-0.25, -0.15, 0, 0, 0, 0, 0, 0), reference=True)
    w = ifn.evidence_weights(t(1, 0, 0), t(2.0, -1.0, 1.0))     # groups 3, 1, 0
    assert w.tolist() == pytest.approx([1 / 9, 1.0, math.exp(-0.8)], rel=1e-6)


def test_evidence_step_fills_the_group_tables_by_hand():
    """One evidence-mode step with groups: the source rows' influence, centred per label and over its
    mean magnitude (1.6), goes into their (label, margin) groups; the step's target rows, centred on
    their own and on the source's scale, into the reference; the step logs the share of source rows
    whose centred influence is positive (a row at exactly 0 is not)."""
    cfg = SelectorConfig(mode="evidence", evidence_groups=True, evidence_shift="none", evidence_bins=(0.0,),
                         evidence_decay=0.0)
    ifn = IFN(cfg, 6)
    labels, logit_src = t(0, 0, 1, 1, 1), t(-1, 1, -1, 1, 1)            # groups 1, 0, 2, 3, 3
    tgt_labels, logit_tgt = t(0, 0, 1, 1), t(1, -1, 1, -1)               # groups 0, 1, 3, 2
    infl = t(1, 3, -2, 1, 4, 1, 3, 0, 2)    # centred: -1, 1 | -3, 0, 3; target -1, 1 | -1, 1
    out = ifn.step(1, torch.zeros(5), 0.0, None, None, influence=infl, labels=labels, logit_src=logit_src,
                   tgt_labels=tgt_labels, logit_tgt=logit_tgt)
    assert out == {"influence_pos_frac": pytest.approx(2 / 5)}
    s = 1.6                                  # mean |centred source influence|
    assert ifn.evidence.src.sum.tolist() == pytest.approx([1 / s, -1 / s, -3 / s, 3 / s])
    assert ifn.evidence.src.count.tolist() == [1.0, 1.0, 1.0, 2.0]
    assert ifn.evidence.ref.sum.tolist() == pytest.approx([-1 / s, 1 / s, 1 / s, -1 / s])
    assert ifn.evidence.ref.count.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_evidence_step_counts_labels_and_margins_for_the_margin_shift():
    """evidence_shift=margin: a step adds its rows to the label counts and its source margins to each
    label's histogram, and logs the two label weights."""
    ifn = IFN(SelectorConfig(mode="evidence", evidence_shift="margin", evidence_shift_z=0.0), 6)
    out = ifn.step(1, torch.zeros(4), 0.0, None, None, labels=t(1, 1, 1, 0), logit_src=t(2.0, -3.0, 0.5, 1.0),
                   tgt_labels=t(1, 0, 0, 0))
    assert ifn.label_shift.counts.tolist() == [[1.0, 3.0], [3.0, 1.0]]
    lo, hi, n = ifn.label_shift.HIST
    bin_of = lambda m: int((m - lo) / (hi - lo) * n)                    # noqa: E731
    assert ifn.label_shift.hist[0].nonzero().flatten().tolist() == [bin_of(-1.0)]     # label 0: margin -1
    assert sorted(ifn.label_shift.hist[1].nonzero().flatten().tolist()) == [bin_of(-3.0), bin_of(0.5), bin_of(2.0)]
    w0, w1 = ifn.label_shift.label_weights().tolist()
    assert out == {"label_weight_0": w0, "label_weight_1": w1} and w1 < w0 == 1.0


def test_evidence_weights_need_the_labels_and_the_source_logits():
    ifn = IFN(SelectorConfig(mode="evidence"), 6)
    for labels, logits in ((t(1, 0), None), (None, t(0.5, -0.5))):
        with pytest.raises(ValueError, match="selector.mode=evidence needs the source labels and the mixed tower's"):
            ifn.select(torch.zeros(2, 6), None, labels, logits)


def test_supervised_step_fits_the_selector_to_the_clean_rows():
    """supervised mode: one step's gradient is that of BCE(logits, 1 - is_harmful), which it logs;
    without the is_harmful column it is refused in one line."""
    import torch.nn.functional as F

    ifn = IFN(SelectorConfig(mode="supervised", hidden=(4,)), 3)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    harmful = torch.tensor([False, True, False, False, True, False])
    loss = F.binary_cross_entropy_with_logits(ifn.selector.logits(x), (~harmful).float())
    want = torch.autograd.grad(loss, ifn.params)
    out = ifn.step(1, ifn.selector.logits(x), 0.0, None, harmful)
    assert out == {"selector_loss": pytest.approx(float(loss))}
    for q, g in zip(ifn.params, want):
        torch.testing.assert_close(q.grad, g)
    with pytest.raises(ValueError, match="selector.mode=supervised needs the is_harmful column"):
        ifn.step(2, ifn.selector.logits(x), 0.0, None, None)
