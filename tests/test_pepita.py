"""PEPITA (``pepita``): the two-pass update against explicit matrix formulas on a tiny
float64 net (BatchNorm and leaky ReLU written out, dropout masks drawn as the network
draws them), what the step leaves alone (BatchNorm's running statistics, autograd),
learning on real Fashion-MNIST, and the command line end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    one_error_line,
    real_fashion_accuracy,
    resume_eval_and_bench,
    smoke_as_mnist,
)

import sigprop.engine.trainer  # noqa: F401  (bind Trainer before tests capture stdout)
from sigprop.cli import main
from sigprop.errors import ConfigError
from sigprop.networks import LEAKY_SLOPE, Dropout, build_network
from sigprop.rules import build_rule
from sigprop.rules.pepita import feedback_matrix

CLASSES = 3
SHAPE = (1, 2, 3)  # d_in = 6


def _bn(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm1d in training mode with scale 1 and shift 0: the batch's biased variance."""
    mean = z.mean(0)
    var = ((z - mean) ** 2).mean(0)
    return (z - mean) / torch.sqrt(var + eps)


def _leaky(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 0, z, LEAKY_SLOPE * z)


def _softmax(a: torch.Tensor) -> torch.Tensor:
    ex = torch.exp(a - a.max(1, keepdim=True).values)
    return ex / ex.sum(1, keepdim=True)


def _reference(Ws, head_W, head_b, F, x, y, masks, last_error):
    """Algorithm 1 written out: standard pass, e, modulated input x + F e, modulated pass;
    returns every weight's change (the quantity SGD descends) as explicit matrix formulas."""
    n = x.shape[0]
    onehot = torch.zeros(n, CLASSES)
    onehot[torch.arange(n), y] = 1.0

    def forward(inp):
        hs, h = [], inp
        for W, m in zip(Ws, masks):
            h = _leaky(_bn(h @ W.T)) * m
            hs.append(h)
        return hs, h @ head_W.T + head_b

    x0 = x.reshape(n, -1)
    hs, out = forward(x0)
    e = _softmax(out) - onehot
    x_mod = x0 + e @ F.T  # h_0^err = x + F e, F (d_in, classes)
    hs_mod, out_mod = forward(x_mod)
    pres = [x_mod] + hs_mod[:-1]
    dWs = [(h - hm).T @ p / n for h, hm, p in zip(hs, hs_mod, pres)]
    e_last = e if last_error == "standard" else _softmax(out_mod) - onehot
    return dWs, e_last.T @ hs_mod[-1] / n, e_last.mean(0)


def _masks(net, n, seed):
    """The dropout masks the network draws after ``torch.manual_seed(seed)``, in order,
    as 0 / 1/(1-p) factors (all ones without dropout)."""
    torch.manual_seed(seed)
    out = []
    for block in net.blocks:
        width = block[1].out_features if isinstance(block[0], torch.nn.Flatten) \
            else block[0].out_features
        drops = [m for m in block if isinstance(m, Dropout)]
        if drops:
            keep = drops[0].keep_mask(torch.empty(n, width))
            out.append(keep.to(torch.float64) * drops[0].scale)
        else:
            out.append(torch.ones(n, width))
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("last_error", ["standard", "modulated"])
def test_update_is_the_two_pass_matrix_formula(dropout, last_error, float64):
    torch.manual_seed(0)
    net = build_network("fc-2x5", SHAPE, CLASSES, dropout=dropout)
    lr, momentum = 0.3, 0.9
    rule = build_rule("pepita", net, CLASSES, lr=lr, pepita_last_error=last_error,
                      pepita_f_scale=2.0, pepita_momentum=momentum)  # F large: big differences
    rule.feedback.F.copy_(torch.randn(6, CLASSES))  # any fixed F
    Ws = [rule.linears[0].weight.detach().clone(), rule.linears[1].weight.detach().clone()]
    head_W, head_b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    head_b.normal_()  # a nonzero bias in the formula
    net.head.bias.data.copy_(head_b)
    F = rule.feedback.F.clone()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(7, *SHAPE, generator=g), torch.randint(0, CLASSES, (7,), generator=g)

    masks = _masks(net, 7, seed=5)
    dWs, dW_head, db_head = _reference(Ws, head_W, head_b, F, x, y, masks, last_error)
    assert all(d.abs().max() > 1e-3 for d in dWs)  # the hidden updates are not vanishing
    rule.set_training(True)
    torch.manual_seed(5)
    rule.train_step(x, y)
    # SGD's first step with momentum: the buffer is the change itself
    for lin, W, dW in zip(rule.linears, Ws, dWs):
        torch.testing.assert_close(lin.weight.detach(), W - lr * dW)
    torch.testing.assert_close(net.head.weight.detach(), head_W - lr * dW_head)
    torch.testing.assert_close(net.head.bias.detach(), head_b - lr * db_head)
    # BatchNorm's scale and shift stay where they were: PEPITA changes weight matrices
    for bn in (net.blocks[0][2], net.blocks[1][1]):
        assert torch.equal(bn.weight, torch.ones(5)) and torch.equal(bn.bias, torch.zeros(5))


def test_running_statistics_count_the_standard_pass_only(float64):
    torch.manual_seed(0)
    net = build_network("fc-1x4", SHAPE, CLASSES)
    rule = build_rule("pepita", net, CLASSES)
    bn = net.blocks[0][2]
    x, y = torch.rand(8, *SHAPE), torch.randint(0, CLASSES, (8,))
    z = x.reshape(8, -1) @ rule.linears[0].weight.detach().T  # the clean pass's BN input
    rule.set_training(True)
    rule.train_step(x, y)
    torch.testing.assert_close(bn.running_mean, 0.1 * z.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * z.var(0))  # unbiased, as torch
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats


def test_no_autograd_graph_and_no_backward():
    torch.manual_seed(0)
    rule = build_rule("pepita", build_network("fc-2x16", SHAPE, CLASSES, dropout=0.1),
                      CLASSES)
    rule.set_training(True)
    loss, correct = rule.train_step(torch.rand(10, *SHAPE), torch.randint(0, CLASSES, (10,)))
    assert not loss.requires_grad and loss.shape == (1,) and correct.shape == (1,)
    for p in rule.network.parameters():
        assert p.grad is None or p.grad.grad_fn is None


def test_feedback_init_and_weights_follow_the_reference():
    torch.manual_seed(0)
    net = build_network("fc-2x64", (1, 10, 10), 10)
    rule = build_rule("pepita", net, 10)
    F = rule.feedback.F
    bound = 0.05 * math.sqrt(6 / 100)
    assert F.shape == (100, 10) and F.abs().max() <= bound and F.abs().max() > 0.9 * bound
    for lin in [*rule.linears, net.head]:  # He uniform
        b = math.sqrt(6 / lin.in_features)
        assert lin.weight.abs().max() <= b and lin.weight.abs().max() > 0.9 * b
    assert torch.equal(net.head.bias, torch.zeros(10))
    assert "feedback.F" in rule.state_dict()["modules"]
    assert feedback_matrix(100, 10, 1.0).abs().max() <= math.sqrt(6 / 100)


def test_conv_networks_and_bad_options_are_refused():
    with pytest.raises(ConfigError, match="fully connected networks.*fc-<layers>x<width>"):
        build_rule("pepita", build_network("conv", (1, 28, 28), 10), 10)
    net = build_network("fc-1x8", SHAPE, CLASSES)
    with pytest.raises(ConfigError, match="pepita_f_scale"):
        build_rule("pepita", net, CLASSES, pepita_f_scale=0.0)
    with pytest.raises(ConfigError, match="pepita_momentum"):
        build_rule("pepita", net, CLASSES, pepita_momentum=1.0)


def test_pepita_learns_fashion_mnist(tmp_path):
    """fc-2x800, two epochs of 5,000 real Fashion-MNIST images with the rule's defaults:
    above 75% on 2,000 test images (measured 81.0%; 10 epochs: docs/studies/pepita.md)."""
    acc = real_fashion_accuracy(tmp_path / "run", [
        "--rule", "pepita", "--network", "fc-2x800", "--train-limit", "5000", "--test-limit",
        "2000", "--epochs", "2"])
    assert acc > 0.75, acc


# --------------------------------------------------------------------------- the command line


def test_cli_train_resume_eval_and_bench(fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    base = ["train", "--rule", "pepita", "--network", "fc-2x32", "--data-dir",
            str(fake_fashion), "--run-dir", str(run), "--no-progress"]
    assert main([*base, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "pepita settings: rule.lr 0.1, data.batch_size 64, train.schedule step10" in out
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert cfg["rule"]["name"] == "pepita" and cfg["model"]["dropout"] == 0.1
    resume_eval_and_bench(run, "pepita", "fc-2x32", "1x8x8", capsys)


@pytest.mark.parametrize("argv, match", [
    (["--pepita-f-scale", "-1"], "pepita_f_scale"),
    (["--pepita-last-error", "both"], "pepita_last_error"),
    (["--network", "conv"], "fully connected networks"),
    (["--network", "vgg8b"], "fully connected networks"),
])
def test_cli_refusals_are_one_line_and_write_nothing(argv, match, fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    rc = main(["train", "--rule", "pepita", "--data-dir", str(fake_fashion), "--run-dir",
               str(run), "--epochs", "1", "--no-progress", *argv])
    assert match in one_error_line(capsys, rc)
    assert not run.exists()


def test_paper_config_smoke(fake_fashion, in_tmp, capsys):
    rc = smoke_as_mnist("pepita-mnist", fake_fashion, in_tmp)
    assert rc == 0, capsys.readouterr().err


def test_step10_schedule_is_the_references_decay():
    """lr x0.1 at 60% and 90% of the epochs: the reference's epochs 60 and 90 of 100."""
    from sigprop.engine.trainer import lr_factor

    f = [lr_factor("step10", e, 100) for e in range(100)]
    assert f[59] == 1.0 and f[60] == pytest.approx(0.1) and f[89] == pytest.approx(0.1)
    assert f[90] == pytest.approx(0.01) and f[99] == pytest.approx(0.01)
    assert [lr_factor("step10", e, 10) for e in range(10)] == pytest.approx(
        [1, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01])
