"""Forward-Forward (``ff``): the goodness loss's gradient against a hand-derived formula
on a tiny float64 net, the label in the input, the negatives, both predictions, the
refused networks, learning on Fashion-MNIST, and the command line end to end."""

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
from sigprop.rules.ff import embed_label, normalise, wrong_labels

C = 3  # classes of the tiny nets


def _rms_normalise(z):
    """Each row over the root of its mean square, written out (eps 1e-8 as loeweX)."""
    return z / (torch.sqrt((z ** 2).sum(1, keepdim=True) / z.shape[1]) + 1e-8)


# --------------------------------------------------------------------------- the math


def test_goodness_gradient_is_the_hand_derived_formula(float64):
    """Two ReLU layers. Per layer, with h = relu(a), a = W x + b, x the normalised input,
    the logit l_i = sum_j h_ij^2 - theta d, t_i = 1 for positives (first n), 0 else:

        dL/dh_ij = (sigmoid(l_i) - t_i) / (2n) * 2 h_ij
                 + peer * [i < n] (0.1 / n) (2 / d) (m_j - mean_k m_k)

    with the peer term's running means m = 0.9 * 0.5 + 0.1 * mean over positives of h;
    dW = (dL/dh ⊙ 1[a > 0])^T x, db its column sums."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU()),
              nn.Sequential(nn.Linear(5, 4), nn.ReLU())]
    net = Network(blocks, nn.Linear(4, C), (1, 3, 4))
    theta, peer = 0.7, 0.03
    rule = build_rule("ff", net, C, ff_threshold=theta, ff_peer_norm=peer)
    n = 6
    x, y = torch.rand(n, 1, 3, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(9)
    neg = wrong_labels(y, C)
    # the reference, by hand: the label written over the first C pixels
    flat = x.reshape(n, 12)
    pos_in, neg_in = flat.clone(), flat.clone()
    pos_in[:, :C], neg_in[:, :C] = torch.eye(C)[y], torch.eye(C)[neg]
    inp = _rms_normalise(torch.cat([pos_in, neg_in]))
    t = torch.cat([torch.ones(n), torch.zeros(n)])
    want, means = [], []
    for lin in (blocks[0][1], blocks[1][0]):
        W, b = lin.weight.detach(), lin.bias.detach()
        a = inp @ W.T + b
        h = a.clamp(min=0)
        d = h.shape[1]
        logit = (h ** 2).sum(1) - theta * d
        dh = ((torch.sigmoid(logit) - t) / (2 * n))[:, None] * 2 * h
        m = 0.9 * 0.5 + 0.1 * h[:n].mean(0)
        dh[:n] += peer * (0.1 / n) * (2 / d) * (m - m.mean())
        delta = dh * (a > 0)
        want += [delta.T @ inp, delta.sum(0)]
        means.append(m)
        inp = _rms_normalise(h)
    rule.set_training(True)
    rule.optimizer.step = lambda *a, **k: None
    torch.manual_seed(9)  # the same negatives
    rule.train_step(x, y)
    got = [p.grad for b in blocks for p in b.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(rule.peer.mean0, means[0])
    torch.testing.assert_close(rule.peer.mean1, means[1])


def test_label_embedding_normalisation_and_negatives():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4) + 1
    code = torch.tensor([[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    z = embed_label(x, code)
    assert z.shape == (2, 16)
    assert torch.equal(z[:, :3], code) and torch.equal(z[:, 3:], x.view(2, 16)[:, 3:])
    torch.testing.assert_close(normalise(z).pow(2).mean(1), torch.ones(2))
    torch.manual_seed(0)
    y = torch.arange(10).repeat(2000)
    neg = wrong_labels(y, 10)
    assert not (neg == y).any()
    counts = torch.bincount((neg - y) % 10, minlength=10)  # every other label, evenly
    assert counts[0] == 0 and counts[1:].min() > 0.8 * 20000 / 9


def test_goodness_prediction_tries_every_label_in_one_batch():
    """The batched scores equal, label by label, the goodness summed over every layer but
    the first with that label written into the input (evaluation mode)."""
    torch.manual_seed(0)
    rule = build_rule("ff", build_network("fc-3x16", (1, 4, 4), C), C)
    rule.set_training(True)
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % C
    rule.train_step(x, y)
    rule.set_training(False)
    assert rule.scored == [1, 2]
    got = rule.exit_scores(x)[0]
    for c in range(C):
        h = normalise(embed_label(x, F.one_hot(torch.full((8,), c), C).float()))
        total = torch.zeros(8)
        for k, block in enumerate(rule.network.blocks):
            h = block(h)
            if k >= 1:
                total += h.pow(2).sum(1)
            h = normalise(h)
        torch.testing.assert_close(got[:, c], total)
    one = build_rule("ff", build_network("fc-1x16", (1, 4, 4), C), C)
    assert one.scored == [0]  # a one-layer net scores its only layer


def test_softmax_readout_reads_the_neutral_input_and_leaves_the_blocks_alone(float64):
    """The readout learns by cross-entropy on the neutral input's normalised activities
    (evaluation mode); the blocks, their statistics and the negatives are the same as
    with the goodness prediction."""
    torch.manual_seed(0)
    net = build_network("fc-2x8", (1, 4, 4), C)
    goodness_rule = build_rule("ff", copy.deepcopy(net), C)
    rule = build_rule("ff", net, C, ff_predict="softmax")
    assert rule.exit_names == ["softmax"] and goodness_rule.exit_names == ["goodness"]
    x, y = torch.rand(10, 1, 4, 4), torch.arange(10) % C
    rule.readout.weight.data.normal_()  # (it starts at zero, which hides a wrong input)
    feats = rule._features(x)
    rule.network.eval()
    h = normalise(embed_label(x, torch.full((10, C), 1 / C)))
    h = rule.network.blocks[0](h)
    want_feats = normalise(rule.network.blocks[1](normalise(h)))
    torch.testing.assert_close(feats, want_feats)
    for r in (rule, goodness_rule):
        r.set_training(True)
        r.optimizer.step = lambda *a, **k: None
        torch.manual_seed(3)
        r.train_step(x, y)
    feats = rule._features(x)  # with the statistics the step's own passes left
    logits = feats @ rule.readout.weight.detach().T
    want = ((logits.softmax(1) - F.one_hot(y, C)) / 10).T @ feats
    torch.testing.assert_close(rule.readout.weight.grad, want)
    for a, b in zip(rule.network.state_dict().values(),
                    goodness_rule.network.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(rule.network.parameters(), goodness_rule.network.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_no_gradient_crosses_a_block_boundary():
    torch.manual_seed(0)
    rule = build_rule("ff", build_network("fc-3x16", (1, 8, 8), 10, 0.1), 10)
    seen = []
    hooks = [b[0].register_forward_pre_hook(lambda mod, args, i=i: seen.append(
        (i, args[0].requires_grad))) for i, b in enumerate(rule.network.blocks)]
    rule.set_training(True)
    rule.train_step(torch.rand(8, 1, 8, 8), torch.arange(8))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 3 and not any(rg for _, rg in seen)


@pytest.mark.parametrize("predict", ["goodness", "softmax"])
def test_lowers_its_loss_on_a_fixed_batch(predict):
    torch.manual_seed(0)
    rule = build_rule("ff", build_network("fc-3x100", (1, 16, 16), 10), 10, lr=2e-3,
                      ff_predict=predict)
    lowers_loss(rule, (1, 16, 16))


def test_epoch_metrics_per_layer():
    torch.manual_seed(0)
    rule = build_rule("ff", build_network("fc-2x16", (1, 4, 4), C), C)
    rule.set_training(True)
    for _ in range(3):
        rule.train_step(torch.rand(8, 1, 4, 4), torch.arange(8) % C)
    m = rule.epoch_metrics()
    assert len(m["ff_loss_layers"]) == 2 and all(0 <= s <= 1 for s in m["ff_separation_layers"])
    assert rule.epoch_metrics() == {}  # each epoch counts afresh


@pytest.mark.parametrize("network,shape,match", [
    ("conv", (1, 28, 28), "fully connected layers; use --network fc-"),
    ("vgg8b", (3, 32, 32), "fully connected layers; use --network fc-"),
    ("hopfield-1x8", (1, 4, 4), "hopfield network's state is the fixed point"),
    ("fc-1x8", (1, 3, 3), "first 10 input values; samples of 9 values"),
])
def test_refused_networks(network, shape, match):
    with pytest.raises(ConfigError, match=match):
        build_rule("ff", build_network(network, shape, 10), 10)


# --------------------------------------------------------------------------- learning


def _fashion_or_skip():
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize("predict,least", [("goodness", 0.62), ("softmax", 0.70)])
def test_learns_fashion_mnist(predict, least, tmp_path):
    """fc-2x500, two epochs of 5,000 real Fashion-MNIST images (docs/studies/forward-forward.md)."""
    _fashion_or_skip()
    run = tmp_path / "run"
    assert main(["train", "--rule", "ff", "--ff-predict", predict, "--network", "fc-2x500",
                 "--train-limit", "5000", "--epochs", "2", "--test-limit", "2000",
                 "--run-dir", str(run), "--no-progress"]) == 0
    acc = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert acc > least, acc


# --------------------------------------------------------------------------- command line


def test_train_resume_eval_and_bench(fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    base = ["train", "--rule", "ff", "--data-dir", str(fake_fashion), "--train-limit", "256",
            *FAST]
    assert main([*base, "--run-dir", str(run), "--epochs", "1"]) == 0
    assert "data.inputs unit" in capsys.readouterr().out  # the rule's own default, said
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2",
                 "--no-progress"]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert len(history[-1]["ff_separation_layers"]) == 2
    # resumed equals uninterrupted: the negatives' draws and the peer means carry over
    straight = in_tmp / "straight"
    assert main([*base, "--run-dir", str(straight), "--epochs", "2"]) == 0
    again = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(history, again):
        assert (a["train_loss"], a["test_acc"], a["ff_loss_layers"]) == \
            (b["train_loss"], b["test_acc"], b["ff_loss_layers"])
    recorded = json.loads((run / "config.json").read_text())["config"]
    assert recorded["rule"]["ff_threshold"] == 0.5 and recorded["data"]["inputs"] == "unit"
    assert main(["eval", str(run)]) == 0
    capsys.readouterr()
    assert main(["bench", "--network", "fc-2x32", "--input", "1x8x8", "--batch-size", "4",
                 "--rules", "backprop,ff", "--steps", "1", "--repeats", "1",
                 "--warmup", "1"]) == 0
    assert "| ff time |" in capsys.readouterr().out


@pytest.mark.parametrize("flags,match", [
    (["--ff-predict", "vote"], "ff_predict must be one of: goodness, softmax"),
    (["--ff-threshold", "-1"], "ff_threshold"),
    (["--network", "conv"], "rule 'ff' trains fully connected networks"),
])
def test_bad_values_are_one_line_before_any_folder(flags, match, fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    rc = main(["train", "--rule", "ff", "--data-dir", str(fake_fashion), "--run-dir",
               str(run), "--no-progress", *flags])
    assert match in one_error_line(capsys, rc)
    assert not run.exists()


def test_named_config_is_the_papers_setting():
    exp = load_experiment("ff-mnist")
    runs = exp.runs("full")
    nets = {p.config.model.network for p in runs}
    assert "fc-4x2000" in nets
    for p in runs:
        if p.config.rule.name == "ff":
            assert p.config.data.inputs == "unit" and p.config.data.batch_size == 100
            if p.config.model.network == "fc-4x2000":
                assert p.config.train.epochs == 60
    assert exp.runs("smoke")
    assert math.isclose(exp.rows[0].paper["ff-goodness"].mean, 1.36)


@pytest.mark.slow
def test_named_config_smoke_runs_on_a_fake_mnist(in_tmp):
    folder = make_mnist(in_tmp / "data" / "mnist", n=256)
    assert main(["reproduce", "ff-mnist", "--budget", "smoke", "--data-dir",
                 str(folder.parent), "--out", str(in_tmp / "out"), "--no-progress"]) == 0
    assert "FF (goodness)" in (in_tmp / "out" / "report.md").read_text()
