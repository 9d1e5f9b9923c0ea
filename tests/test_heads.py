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


def test_build_head_refuses_an_unknown_head():
    with pytest.raises(ValueError, match="model.head='din'"):
        build_head("din", 8, 2, (4,))


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
                                       ["model.head=afm"], ["model.dann_weight=0.1", "selector.mode=fixed"]])
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
