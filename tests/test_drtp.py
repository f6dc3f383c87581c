"""Direct random target projection (``drtp``): each block's update against the paper's
matrix formula on tiny float64 nets (fc and conv), the fixed projections, no gradient
across a block boundary, learning on Fashion-MNIST, and the command line end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, lowers_loss, make_mnist, one_error_line
from torch import nn

from sigprop.cli import main
from sigprop.errors import ConfigError
from sigprop.experiments import load_experiment
from sigprop.networks import Network, build_network
from sigprop.rules import build_rule

CLASSES = 4


def _grads_of_one_step(rule, x, y):
    """The gradients one training step leaves (the optimizer's step patched out)."""
    rule.set_training(True)
    rule.optimizer.step = lambda *a, **k: None
    rule.train_step(x, y)
    return [p.grad.clone() for p in rule.network.parameters()]


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_update_of_every_layer_is_the_matrix_formula(output, float64):
    """Tanh blocks (the paper's): delta_k = (B_k^T y*) ⊙ f'(a_k), dW_k = delta_k^T h_{k-1}
    summed over the batch; the output layer from (sigmoid(a) - y*)/(n C) or
    (softmax(a) - y*)/n."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh()),
              nn.Sequential(nn.Linear(5, 3), nn.Tanh())]
    net = Network(blocks, nn.Linear(3, CLASSES), (1, 2, 3))
    rule = build_rule("drtp", net, CLASSES, drtp_output=output)
    n = 7
    x, y = torch.randn(n, 1, 2, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    W1, b1 = blocks[0][1].weight.detach(), blocks[0][1].bias.detach()
    W2, b2 = blocks[1][0].weight.detach(), blocks[1][0].bias.detach()
    W3, b3 = net.head.weight.detach(), net.head.bias.detach()
    B1, B2 = rule.targets.B0, rule.targets.B1
    assert B1.shape == (CLASSES, 5) and B2.shape == (CLASSES, 3)
    ystar = F.one_hot(y, CLASSES).double()
    h0 = x.reshape(n, 6)
    a1 = h0 @ W1.T + b1
    h1 = torch.tanh(a1)
    a2 = h1 @ W2.T + b2
    h2 = torch.tanh(a2)
    a3 = h2 @ W3.T + b3
    d1 = (ystar @ B1) * (1 - h1 ** 2)
    d2 = (ystar @ B2) * (1 - h2 ** 2)
    if output == "sigmoid":
        d3 = (torch.sigmoid(a3) - ystar) / (n * CLASSES)
    else:
        d3 = (torch.exp(a3) / torch.exp(a3).sum(1, keepdim=True) - ystar) / n
    expected = [d1.T @ h0, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]
    for got, want in zip(_grads_of_one_step(rule, x, y), expected):
        torch.testing.assert_close(got, want)


def test_conv_projection_has_the_conv_output_shape_and_the_formula(float64):
    """A conv block's B_k^T y* is shaped like the conv's output (C, H, W) before the
    pooling; dW[o, c, i, j] = sum over samples and positions of delta[o, p, q] times the
    input at (c, p + i, q + j), written with an explicit unfold."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    blocks = [nn.Sequential(conv, nn.Tanh(), nn.MaxPool2d(2)),
              nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 5), nn.Tanh())]
    net = Network(blocks, nn.Linear(5, CLASSES), (2, 4, 4))
    rule = build_rule("drtp", net, CLASSES)
    assert rule.targets.shapes == [(3, 4, 4), (5,)]
    n = 5
    x, y = torch.randn(n, 2, 4, 4), torch.tensor([3, 0, 1, 2, 3])
    W, b = conv.weight.detach(), conv.bias.detach()
    cols = F.unfold(x, 3, padding=1)  # (n, 2*3*3, 16): the input patch at every position
    a = (W.view(3, -1) @ cols).view(n, 3, 4, 4) + b.view(1, 3, 1, 1)
    proj = (F.one_hot(y, CLASSES).double() @ rule.targets.B0).view(n, 3, 4, 4)
    delta = proj * (1 - torch.tanh(a) ** 2)
    dW = torch.einsum("nop,nkp->ok", delta.view(n, 3, 16), cols).view_as(W)
    grads = _grads_of_one_step(rule, x, y)
    torch.testing.assert_close(grads[0], dW)
    torch.testing.assert_close(grads[1], delta.sum((0, 2, 3)))


def test_library_blocks_take_the_projection_at_their_activation(float64):
    """On fc blocks (Linear -> BatchNorm -> LeakyReLU -> Dropout) the projection enters at
    the activation's output and flows back through the block alone: each block's
    gradients are those of <core(h_in), B_k^T y*> for its detached input; the head's are
    its binary cross-entropy's."""
    torch.manual_seed(0)
    net = build_network("fc-2x16", (1, 4, 4), CLASSES, dropout=0.2)
    rule = build_rule("drtp", net, CLASSES)
    ref = copy.deepcopy(net)
    x, y = torch.randn(12, 1, 4, 4), torch.arange(12) % CLASSES
    ref.train()
    torch.manual_seed(5)  # the dropout masks: the same draws on both paths
    h = x
    for k, block in enumerate(ref.blocks):
        core, tail = block[:-1], block[-1]  # [Flatten] Linear BN LeakyReLU | Dropout
        a = core(h.detach())
        (a * getattr(rule.targets, f"B{k}")[y]).sum().backward()
        h = tail(a.detach())
    logits = ref.head(h)
    F.binary_cross_entropy_with_logits(logits, F.one_hot(y, CLASSES).double()).backward()
    want = [p.grad for p in ref.parameters()]
    torch.manual_seed(5)
    for got, w in zip(_grads_of_one_step(rule, x, y), want):
        torch.testing.assert_close(got, w)


def test_projections_are_fixed_saved_and_from_the_reference_distribution():
    torch.manual_seed(0)
    rule = build_rule("drtp", build_network("fc-2x64", (1, 8, 8), 10), 10)
    B = [rule.targets.B0.clone(), rule.targets.B1.clone()]
    for b in B:
        bound = math.sqrt(6 / 64)  # kaiming_uniform_ on (classes, 64): fan_in 64
        assert b.shape == (10, 64) and b.abs().max() <= bound and b.std() > bound / 3
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    rule.set_training(True)
    for _ in range(3):
        rule.train_step(x, y)
    assert torch.equal(B[0], rule.targets.B0) and torch.equal(B[1], rule.targets.B1)
    state = rule.state_dict()["modules"]
    assert "targets.B0" in state and "targets.B1" in state


@pytest.mark.parametrize("network", ["fc-3x100", "conv"])
def test_lowers_its_loss_on_a_fixed_batch(network):
    torch.manual_seed(0)
    rule = build_rule("drtp", build_network(network, (1, 16, 16), 10), 10, lr=2e-3)
    lowers_loss(rule, (1, 16, 16))


def test_hopfield_networks_and_bad_options_are_refused():
    with pytest.raises(ConfigError, match="hopfield network's state is the fixed point"):
        build_rule("drtp", build_network("hopfield-1x8", (1, 4, 4), 10), 10)
    with pytest.raises(ConfigError, match="drtp_output must be one of: sigmoid, softmax"):
        build_rule("drtp", build_network("fc-1x8", (1, 4, 4), 10), 10, drtp_output="tanh")


# --------------------------------------------------------------------------- learning


def test_learns_fashion_mnist(tmp_path):
    """fc-3x1000, two epochs of 5,000 real Fashion-MNIST images: above 72% (measured
    0.7485 on the first 2,000 test images; docs/studies/drtp.md)."""
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    run = tmp_path / "run"
    assert main(["train", "--rule", "drtp", "--network", "fc-3x1000", "--train-limit", "5000",
                 "--epochs", "2", "--test-limit", "2000", "--run-dir", str(run),
                 "--no-progress"]) == 0
    acc = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert acc > 0.72, acc


# --------------------------------------------------------------------------- command line


def test_train_resume_eval_and_bench(fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    base = ["train", "--rule", "drtp", "--data-dir", str(fake_fashion), "--run-dir", str(run),
            "--train-limit", "256", *FAST]
    assert main([*base, "--epochs", "1"]) == 0
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2",
                 "--no-progress"]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert json.loads((run / "config.json").read_text())["config"]["rule"]["drtp_output"] \
        == "sigmoid"
    assert main(["eval", str(run)]) == 0
    capsys.readouterr()
    for network, shape in (("fc-2x32", "1x8x8"), ("conv", "1x16x16")):
        assert main(["bench", "--network", network, "--input", shape, "--batch-size", "4",
                     "--rules", "backprop,drtp", "--steps", "1", "--repeats", "1",
                     "--warmup", "1"]) == 0
        assert "| drtp time |" in capsys.readouterr().out


@pytest.mark.parametrize("flags,match", [
    (["--drtp-output", "tanh"], "drtp_output must be one of: sigmoid, softmax"),
    (["--network", "hopfield-2x16", "--dropout", "0"], "rule 'drtp' trains feedforward"),
])
def test_bad_values_are_one_line_before_any_folder(flags, match, fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    rc = main(["train", "--rule", "drtp", "--data-dir", str(fake_fashion), "--run-dir",
               str(run), "--no-progress", *flags])
    assert match in one_error_line(capsys, rc)
    assert not run.exists()


# --------------------------------------------------------------------------- named config


def test_named_config_is_the_references_setting():
    exp = load_experiment("drtp-mnist")
    runs = exp.runs("full")
    assert {p.config.model.network for p in runs} == {"fc-1x1000", "fc-2x800", "conv"}
    for p in runs:
        assert p.config.data.dataset == "mnist" and p.config.data.batch_size == 100
        assert p.config.data.inputs == "unit" and p.config.train.epochs == 100
        assert p.config.train.schedule == "none"
        if p.config.rule.name == "drtp":
            assert p.config.rule.resolved().drtp_output == "sigmoid"
    assert exp.runs("smoke") and exp.runs("quick")


@pytest.mark.slow
def test_named_config_smoke_runs_on_a_fake_mnist(in_tmp):
    folder = make_mnist(in_tmp / "data" / "mnist", n=256)
    assert main(["reproduce", "drtp-mnist", "--budget", "smoke", "--data-dir",
                 str(folder.parent), "--out", str(in_tmp / "out"), "--no-progress"]) == 0
    assert "DRTP" in (in_tmp / "out" / "report.md").read_text()
