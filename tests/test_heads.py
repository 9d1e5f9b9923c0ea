"""Baseline heads (LR, DeepFM, AFM) and DANN's gradient reversal, pinned against hand computation."""

import itertools

import pytest
import torch

from cctl_rec.modules.heads import AFMHead, DeepFMHead, DomainClassifier, GradReverse, LRHead, build_head, fm_interaction


def test_fm_interaction_is_the_sum_of_pairwise_dot_products():
    torch.manual_seed(0)
    v = torch.randn(5, 4, 3)  # B X F X D
    brute = sum((v[:, f] * v[:, g]).sum(-1) for f, g in itertools.combinations(range(4), 2))
    assert torch.allclose(fm_interaction(v), brute, atol=1e-5)


def test_deepfm_is_linear_plus_fm_plus_mlp():
    torch.manual_seed(0)
    h = DeepFMHead(12, 3, (8,))
    x = torch.randn(6, 12)
    expect = h.linear(x).squeeze(-1) + h.deep(x).squeeze(-1) + fm_interaction(x.view(6, 4, 3))
    assert torch.allclose(h(x), expect, atol=1e-6)


def test_afm_attention_over_pairs_by_hand():
    torch.manual_seed(0)
    h = AFMHead(9, 3, attn=4)
    x = torch.randn(2, 9)
    v = x.view(2, 3, 3)
    out = []
    for b in range(2):
        pairs = torch.stack([v[b, f] * v[b, g] for f, g in itertools.combinations(range(3), 2)])  # P X D
        a = torch.softmax(h.attn(pairs).squeeze(-1), dim=0)
        out.append(h.linear(x[b]).squeeze() + h.p((a.unsqueeze(-1) * pairs).sum(0)).squeeze())
    assert torch.allclose(h(x), torch.stack(out), atol=1e-6)


def test_lr_is_affine_in_the_embeddings():
    h = LRHead(6)
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    b = h.linear.bias
    assert torch.allclose(h(x + y) - b, (h(x) - b) + (h(y) - b), atol=1e-6)


def test_star_layer_is_shared_times_domain_weight_plus_summed_bias():
    from cctl_rec.modules.heads import StarTower

    torch.manual_seed(0)
    t = StarTower(4, (3,))
    with torch.no_grad():
        for p in list(t.w.values()) + list(t.b.values()):
            p.normal_()
    x = torch.randn(5, 4)
    for d in ("tgt", "src"):
        h = torch.relu(x @ (t.shared[0].weight * t.w[f"{d}_0"]).T + t.shared[0].bias + t.b[f"{d}_0"])
        out = h @ (t.shared[1].weight * t.w[f"{d}_1"]).T + t.shared[1].bias + t.b[f"{d}_1"]
        assert torch.allclose(t(x, d), out.squeeze(-1), atol=1e-6)
    assert not torch.allclose(t(x, "tgt"), t(x, "src"))


def test_build_head_refuses_an_unknown_head():
    with pytest.raises(ValueError, match="model.head='dien'"):
        build_head("dien", 8, 2, (4,))


def test_gradient_reversal_flips_the_sign_and_the_classifier_learns():
    x = torch.randn(4, 3, requires_grad=True)
    GradReverse.apply(x, 1.0).sum().backward()
    assert torch.equal(x.grad, -torch.ones(4, 3))
    clf = DomainClassifier(3)
    z = torch.randn(8, 3, requires_grad=True)
    y = torch.tensor([0.0] * 4 + [1.0] * 4)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(clf(z), y)
    gz, = torch.autograd.grad(loss, z, retain_graph=True)
    # without the reversal the gradient wrt the features is the opposite
    plain = torch.nn.functional.binary_cross_entropy_with_logits(clf.net(z).squeeze(-1), y)
    gp, = torch.autograd.grad(plain, z)
    assert torch.allclose(gz, -gp, atol=1e-7)


@pytest.mark.parametrize("overrides", [["model.name=dnn", "model.head=deepfm"], ["model.name=dnn", "model.head=lr"],
                                       ["model.head=afm"], ["model.dann_weight=0.1", "selector.mode=fixed"],
                                       ["model.head=star", "selector.mode=fixed"],
                                       ["model.finetune_steps=3", "selector.mode=fixed"]])
def test_baselines_train_and_export(tmp_path, tiny_data, overrides):
    import json

    from cctl_rec.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--config", "configs/cctl_tiny.yaml", "--data", tiny_data, "--run-dir", str(run),
               "data.batch_size=64", "run.steps=6", "model.tower=[8]", "run.max_eval_rows=256", *overrides])
    assert rc == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 6 and 0.0 < m["target_test"]["auc"] < 1.0
    assert main(["export", "--run-dir", str(run), "--out", str(tmp_path / "exp")]) == 0
    meta = json.loads((tmp_path / "exp" / "serving.json").read_text())
    head = next((o.split("=")[1] for o in overrides if o.startswith("model.head=")), "mlp")
    assert meta["head"] == head


def test_finetune_trains_the_mixed_network_on_source_then_target_only(tiny_data):
    """The loss of the Finetune baseline: target term off and every source weight 1 before the
    switch; source weights 0 after it (pinned on scn_losses' arithmetic)."""
    from cctl_rec.models.cctl import CCTLOutput
    from cctl_rec.train.losses import scn_losses

    class B:
        tgt_label = torch.tensor([1.0, 0.0])
        src_label = torch.tensor([0.0, 1.0, 1.0])

    out = CCTLOutput(logit_tgt=torch.tensor([0.3, -0.2]), logit_pure=torch.zeros(2),
                     logit_src=torch.tensor([0.1, 0.5, -1.0]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pre = scn_losses(out, B, torch.ones(3), tgt_weight=0.0)
    assert torch.allclose(pre.mixed, bce(out.logit_src, B.src_label))
    post = scn_losses(out, B, torch.zeros(3), tgt_weight=1.0)
    assert torch.allclose(post.mixed, bce(out.logit_tgt, B.tgt_label))
