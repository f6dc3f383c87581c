"""The paper's comparison rules: feedback alignment (fa), direct feedback alignment
(dfa), local learning with predsim (ll-bp, ll-fa). Backward rules against explicit
matrix formulas, predsim against a slow reference written from the definition, no
gradient across block boundaries, every rule on every network, and learning on real
Fashion-MNIST."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import lowers_loss
from torch import nn

import sigprop.engine.trainer  # noqa: F401  (bind Trainer before tests capture stdout)
from sigprop.cli import main
from sigprop.functional import fa_conv2d_backward, fa_linear_backward, predsim_loss
from sigprop.functional.predsim import pool_kernel, similarity_matrix
from sigprop.networks import build_network
from sigprop.rules import build_rule
from sigprop.rules.feedback_alignment import FAConv2d, FALinear, convert_fa

CLASSES = 10


# --------------------------------------------------------------------------- FA / DFA math


def test_fa_linear_backward_is_the_matrix_formula(float64):
    g, x = torch.randn(5, 3), torch.randn(5, 4)
    B = torch.randn(3, 4)
    gx, gw, gb = fa_linear_backward(g, x, B)
    torch.testing.assert_close(gx, g @ B)  # B in place of W
    torch.testing.assert_close(gw, g.T @ x)  # the true weight gradient
    torch.testing.assert_close(gb, g.sum(0))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fa_with_B_equal_to_W_is_backprop_exactly(kind, float64):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1, stride=2)
    x = torch.randn(5, 6) if kind == "linear" else torch.randn(5, 3, 7, 7)
    ref = copy.deepcopy(layer)
    fa = convert_fa(copy.deepcopy(layer))
    assert isinstance(fa, FALinear if kind == "linear" else FAConv2d)
    fa.fa_weight.copy_(fa.weight.detach())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(ref(x))
    (ref(xa) * g).sum().backward()
    (fa(xb) * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    for p, q in zip(ref.parameters(), fa.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_fa_conv_input_gradient_is_the_transposed_conv_with_B(float64):
    torch.manual_seed(1)
    x, B = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    W = torch.randn(4, 3, 3, 3)
    g = torch.randn(2, 4, 6, 6)
    gx, gw, _ = fa_conv2d_backward(g, x, W, B, (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(gx, F.conv_transpose2d(g, B, padding=1))
    xr = x.clone().requires_grad_()
    Wr = W.clone().requires_grad_()
    (F.conv2d(xr, Wr, padding=1) * g).sum().backward()
    torch.testing.assert_close(gw, Wr.grad)


def test_fa_feedback_is_fixed_saved_and_from_the_init_distribution():
    torch.manual_seed(0)
    rule = build_rule("fa", build_network("fc-2x64", (1, 8, 8), CLASSES), CLASSES)
    fa_layers = [m for m in rule.network.modules() if isinstance(m, FALinear)]
    assert len(fa_layers) == 3  # both blocks' Linears and the head
    B0 = [m.fa_weight.clone() for m in fa_layers]
    for m in fa_layers:  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), like the weight
        bound = 1 / math.sqrt(m.in_features)
        assert m.fa_weight.abs().max() <= bound and m.fa_weight.std() > bound / 3
        assert not m.fa_weight.requires_grad
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, CLASSES, (16,))
    rule.set_training(True)
    for _ in range(3):
        rule.train_step(x, y)
    assert all(torch.equal(a, m.fa_weight) for a, m in zip(B0, fa_layers))
    assert any(k.endswith("fa_weight") for k in rule.state_dict()["modules"])


def test_dfa_update_is_e_times_B_through_each_block_alone(float64):
    """One DFA step equals, block by block, the gradient of <block(h_in), e B_i> for the
    block's detached input, with e = softmax - onehot over n; the head's is CE's own."""
    torch.manual_seed(0)
    net = build_network("fc-2x16", (1, 4, 4), CLASSES)
    rule = build_rule("dfa", net, CLASSES, lr=1e-3)
    ref = copy.deepcopy(net)
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, CLASSES, (12,))
    rule.set_training(True)
    for p in rule._trainable:
        p.grad = None
    # the reference gradients, by hand
    ref.train()
    torch.manual_seed(5)
    h1 = ref.blocks[0](x)
    h2 = ref.blocks[1](h1.detach())
    logits = ref.head(h2.detach())
    F.cross_entropy(logits, y).backward()
    e = (logits.detach().softmax(1) - F.one_hot(y, CLASSES)) / len(y)
    for i, h in enumerate((h1, h2)):
        (h * (e @ rule.feedback.get(i))).sum().backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    # the rule's: patch the optimizer out to read the gradients
    rule.optimizer.step = lambda *a, **k: None
    torch.manual_seed(5)
    rule.train_step(x, y)
    for (name, p), g in zip(rule.network.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, msg=name)


# --------------------------------------------------------------------------- predsim


def ref_similarity(x):
    """The definition, slowly: per-channel spatial std (C > 3, H > 1), then each row
    centred, normalised, all pairwise dot products, clamped."""
    n = x.shape[0]
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        rows = [[float(x[i, c].flatten().std()) for c in range(x.shape[1])] for i in range(n)]
    else:
        rows = [x[i].flatten().tolist() for i in range(n)]
    out = torch.zeros(n, n, dtype=torch.float64)
    vecs = []
    for r in rows:
        mean = sum(r) / len(r)
        c = [v - mean for v in r]
        norm = math.sqrt(sum(v * v for v in c))
        vecs.append([v / (1e-8 + norm) for v in c])
    for i in range(n):
        for j in range(n):
            out[i, j] = max(-1.0, min(1.0, sum(a * b for a, b in zip(vecs[i], vecs[j]))))
    return out


@pytest.mark.parametrize("shape", [(5, 7), (5, 6, 4, 4), (5, 3, 4, 4), (5, 6, 1, 4)])
def test_similarity_matrix_against_its_definition(shape, float64):
    x = torch.randn(*shape)
    torch.testing.assert_close(similarity_matrix(x), ref_similarity(x))


@pytest.mark.parametrize("binary", [False, True])
def test_predsim_loss_against_a_slow_reference(binary, float64):
    torch.manual_seed(0)
    n, beta = 6, 0.3
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    onehot = F.one_hot(y, 3).to(torch.float64)
    code = onehot @ torch.randn(3, 5) if binary else onehot
    logits = torch.randn(n, 5 if binary else 3)
    h = torch.randn(n, 6, 4, 4)
    got = predsim_loss(logits, h, y, code, beta, binary=binary)
    if binary:
        bits = (code > 0).to(torch.float64)
        p = torch.sigmoid(logits)
        pred = -(bits * p.log() + (1 - bits) * (1 - p).log()).mean()
    else:
        pred = -sum(math.log(logits[i].softmax(0)[y[i]]) for i in range(n)) / n
    diff = ref_similarity(h) - ref_similarity(code)
    sim = (diff ** 2).mean()
    torch.testing.assert_close(got, torch.as_tensor((1 - beta) * pred + beta * sim,
                                                    dtype=torch.float64))


@pytest.mark.parametrize("shape,limit,features", [
    ((128, 32, 32), 2048, 2048), ((256, 32, 32), 2048, 2048), ((128, 28, 28), 2048, 2048),
    ((512, 7, 7), 2048, 2048), ((512, 2, 2), 2048, None), ((96, 28, 28), 2048, 96 * 4 * 4),
])
def test_auxiliary_pooling_brings_features_under_the_limit(shape, limit, features):
    pk = pool_kernel(*shape, limit)
    if features is None:
        assert pk is None
        return
    (kh, kw), (ph, pw) = pk
    out = nn.AvgPool2d((kh, kw), padding=(ph, pw))(torch.zeros(1, *shape))
    assert out.numel() == features <= limit
    assert out.shape[2] == math.ceil(shape[1] / kh)


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize("rule_name", ["dfa", "ll-bp", "ll-fa", "drtp"])
def test_no_gradient_crosses_a_block_boundary(rule_name):
    """Every block's first module sees an input outside any autograd graph."""
    torch.manual_seed(0)
    rule = build_rule(rule_name, build_network("conv", (1, 16, 16), CLASSES, 0.1), CLASSES)
    seen = []
    hooks = [b[0].register_forward_pre_hook(lambda mod, args, i=i: seen.append(
        (i, args[0].requires_grad))) for i, b in enumerate(rule.network.blocks)]
    hooks.append(rule.network.head.register_forward_pre_hook(
        lambda mod, args: seen.append(("head", args[0].requires_grad))))
    rule.set_training(True)
    rule.train_step(torch.randn(8, 1, 16, 16), torch.arange(8))
    for h in hooks:
        h.remove()
    assert len(seen) == len(rule.network.blocks) + 1
    assert not any(rg for _, rg in seen), seen


def test_ll_block_split_and_auxiliaries():
    rule = build_rule("ll-bp", build_network("vgg8b", (3, 32, 32), CLASSES, 0.1), CLASSES)
    _, tail = rule.parts[1]  # conv 256, then dropout and the 2x2 pool
    assert [type(m).__name__ for m in tail] == ["Dropout", "MaxPool2d"]
    aux = rule.aux[1]
    assert aux.decoder.in_features == 2048 and aux.decoder.out_features == CLASSES
    assert isinstance(aux.sim, nn.Conv2d) and aux.sim.kernel_size == (3, 3)
    assert torch.count_nonzero(aux.decoder.weight) == 0  # starts at zero, as local-loss
    bio = build_rule("ll-fa", build_network("vgg8b", (3, 32, 32), CLASSES, 0.1), CLASSES)
    assert isinstance(bio.aux[1].decoder, FALinear) and bio.aux[1].sim is None
    assert bio.aux[1].decoder.out_features == 128 and not bio.aux[1].proj.weight.requires_grad
    assert rule.beta == 0.99 and bio.beta == 0.01
    assert build_rule("ll-fa", build_network("fc-2x16", (1, 4, 4), CLASSES), CLASSES,
                      ll_beta=0.5).beta == 0.5


@pytest.mark.parametrize("network", ["fc-3x100", "conv"])
@pytest.mark.parametrize("rule_name", ["fa", "dfa", "ll-bp", "ll-fa"])
def test_each_rule_lowers_its_loss_on_a_fixed_batch(network, rule_name):
    torch.manual_seed(0)
    rule = build_rule(rule_name, build_network(network, (1, 16, 16), CLASSES), CLASSES,
                      lr=2e-3)
    lowers_loss(rule, (1, 16, 16))


@pytest.mark.slow
@pytest.mark.parametrize("network", ["vgg8b", "vgg8b-2x"])
@pytest.mark.parametrize("rule_name", ["fa", "dfa", "ll-bp", "ll-fa"])
def test_each_rule_lowers_its_loss_on_vgg(network, rule_name):
    torch.manual_seed(0)
    rule = build_rule(rule_name, build_network(network, (1, 16, 16), CLASSES), CLASSES,
                      lr=2e-3)
    lowers_loss(rule, (1, 16, 16))


def test_rule_checkpoints_round_trip_and_eval(tmp_path, fake_fashion, isolated_data):
    for rule_name in ("fa", "dfa", "ll-bp", "ll-fa"):
        run = tmp_path / rule_name
        assert main(["train", "--rule", rule_name, "--network", "fc-2x32", "--data-dir",
                     str(fake_fashion), "--epochs", "1", "--batch-size", "64", "--run-dir",
                     str(run), "--no-progress"]) == 0
        assert main(["eval", str(run)]) == 0


def test_ll_options_are_checked():
    from sigprop.errors import ConfigError

    net = build_network("fc-2x16", (1, 4, 4), CLASSES)
    with pytest.raises(ConfigError, match="ll_beta"):
        build_rule("ll-bp", net, CLASSES, ll_beta=1.5)
    with pytest.raises(ConfigError, match="ll_features"):
        build_rule("ll-bp", net, CLASSES, ll_features=0)


@pytest.mark.parametrize("rule_name", ["fa", "dfa", "ll-bp", "ll-fa"])
def test_rule_learns_fashion_mnist(rule_name, tmp_path):
    """fc-3x1000, one epoch of 5,000 real Fashion-MNIST images: above 72%."""
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    run = tmp_path / "run"
    assert main(["train", "--rule", rule_name, "--network", "fc-3x1000", "--train-limit",
                 "5000", "--epochs", "1", "--run-dir", str(run), "--no-progress"]) == 0
    acc = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert acc > 0.72, acc
