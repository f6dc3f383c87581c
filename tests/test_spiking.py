"""Spiking networks (Sec. VI): IF dynamics on hand-computed sequences, the arctan
surrogate against autograd of Eq. 16, the one-node IF sequence against the
op-by-op reference, locality of the sigprop models (no gradient across a block or
through a spike), every model lowering its loss, amp, errors, and learning on real
Fashion-MNIST."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigprop  # noqa: F401  (registers the rules)
import sigprop.engine.trainer  # noqa: F401  (bind Trainer before tests capture stdout)
from helpers import lowers_loss
from sigprop.cli import main
from sigprop.errors import ConfigError
from sigprop.functional import spiking as SNN
from sigprop.networks import build_network
from sigprop.networks.spiking import SpikingNetwork
from sigprop.rules import build_rule

MODELS = ("bp-surrogate", "shallow", "sp-surrogate", "sp-voltage")


def snn(rule="sp-surrogate", shape=(1, 28, 28), seed=0, **kw):
    torch.manual_seed(seed)
    return build_rule(rule, build_network("snn-conv", shape, 10), 10, **kw)


# ------------------------------------------------------------------ the neuron


def test_if_step_charges_fires_at_threshold_and_resets():
    h = torch.tensor([0.3, 0.2, 0.25, 0.6, 0.1])
    v = torch.zeros(())
    spikes, volts = [], []
    for ht in h:
        s, v = SNN.if_step(ht, v, 0.5)
        spikes.append(float(s))
        volts.append(float(v))
    # 0.3 -> 0.5 reaches the threshold (fires, >=) -> 0 -> 0.25 -> 0.85 fires -> 0 -> 0.1
    assert spikes == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert volts == pytest.approx([0.3, 0.0, 0.25, 0.0, 0.1])


def test_if_sequence_static_input_and_reset_value():
    s, u = SNN.if_sequence(torch.tensor([0.4]), 1.0, static=4)
    # charges 0.4, 0.8, 1.2 (fires, reset to 0), 0.4
    assert s.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    assert u.flatten().tolist() == pytest.approx([0.4, 0.8, 1.2, 0.4])
    s, u = SNN.if_sequence(torch.tensor([[0.6], [0.6]]), 0.5, v_reset=0.2)
    # starts at v_reset: 0.2 + 0.6 fires, resets to 0.2, again
    assert s.flatten().tolist() == [1.0, 1.0] and u.flatten().tolist() == pytest.approx([0.8, 0.8])


def test_surrogate_gradient_is_the_derivative_of_eq16():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(SNN.atan_surrogate(x).sum(), x)
    assert torch.allclose(SNN.atan_surrogate_grad(x.detach()), auto)
    assert SNN.atan_surrogate(torch.zeros(1)).item() == pytest.approx(0.5)
    # the spike: a Heaviside step forward, Eq. 17 backward
    s = SNN.SpikeATan.apply(x)
    assert torch.equal(s, (x >= 0).double())
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.allclose(g, 1 / (1 + (math.pi * x.detach()) ** 2))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("bptt", [True, False])
def test_if_run_matches_the_op_by_op_reference(static, bptt):
    g = torch.Generator().manual_seed(0)
    shape = (5, 3, 4) if static else (4, 5, 3, 4)
    h = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    ws, wc = (torch.randn(4, 5, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))

    def grads(spikes, charged):
        loss = (charged * wc).sum() + ((spikes * ws).sum() if bptt else 0)
        return torch.autograd.grad(loss, h)[0]

    s1, u1 = SNN.if_sequence(h, 0.5, detach_carry=not bptt, static=4 if static else False)
    s2, u2 = SNN.if_run(h, 0.5, 4 if static else None, bptt=bptt)
    assert torch.equal(s1, s2) and torch.allclose(u1, u2)
    assert torch.allclose(grads(s1, u1), grads(s2, u2), atol=1e-12)
    assert s2.requires_grad == bptt  # local mode: the spikes carry no gradient


def test_surrogate_activity_matches_autograd_of_eq16():
    u = torch.randn(50, dtype=torch.float64, requires_grad=True)
    a1, a2 = SNN.atan_surrogate(u - 0.5), SNN.surrogate_activity(u, 0.5)
    assert torch.allclose(a1, a2)
    w = torch.randn(50, dtype=torch.float64)
    g1, g2 = (torch.autograd.grad((a * w).sum(), u)[0] for a in (a1, a2))
    assert torch.allclose(g1, g2)


def test_matches_snntorch_leaky_with_beta_one():
    """Optional: snnTorch's Leaky(beta=1, reset to zero, atan surrogate) step by step.

    snnTorch fires on ``mem > threshold`` where we (and SpikingJelly) fire on ``>=``;
    random currents never hit the threshold exactly. It returns the voltage after the
    reset, ours the charged one before it: compared as u (1 - s)."""
    snntorch = pytest.importorskip("snntorch")
    from snntorch import surrogate

    g = torch.Generator().manual_seed(3)
    h = (torch.rand(6, 8, 5, generator=g, dtype=torch.float64) * 0.9).requires_grad_()
    w_s, w_v = (torch.randn(6, 8, 5, generator=g, dtype=torch.float64) for _ in range(2))
    lif = snntorch.Leaky(beta=1.0, threshold=0.5, spike_grad=surrogate.atan(),
                         reset_mechanism="zero", reset_delay=False)
    mem = torch.zeros(8, 5, dtype=torch.float64)
    ref_s, ref_v = [], []
    for t in range(6):
        s, mem = lif(h[t], mem)
        ref_s.append(s)
        ref_v.append(mem)
    ref_s, ref_v = torch.stack(ref_s), torch.stack(ref_v)
    s, u = SNN.if_run(h, 0.5)
    v = u * (1 - s)
    assert torch.equal(s.double(), ref_s.double())
    assert torch.allclose(v, ref_v)
    ours, = torch.autograd.grad((s * w_s).sum() + (v * w_v).sum(), h)
    theirs, = torch.autograd.grad((ref_s * w_s).sum() + (ref_v * w_v).sum(), h)
    assert torch.allclose(ours, theirs)


# ------------------------------------------------------------------ the network


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_snn_conv_shapes(shape):
    net = build_network("snn-conv", shape, 10)
    assert isinstance(net, SpikingNetwork) and net.steps == 4
    side = shape[1] // 4
    assert net.block_shapes == [(4, 128, 2 * side, 2 * side), (4, 128, side, side), (4, 2048)]
    out = net(torch.randn(3, *shape))
    assert out.shape == (3, 10)
    spikes = net.blocks[0](torch.randn(3, *shape))
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}


def test_snn_errors():
    with pytest.raises(ConfigError, match="snn-conv"):
        build_network("snn-vgg", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="dropout"):
        build_network("snn-conv", (1, 28, 28), 10, dropout=0.1)
    with pytest.raises(ConfigError, match="4x4"):
        build_network("snn-conv", (1, 3, 3), 10)
    with pytest.raises(ConfigError, match="does not train spiking"):
        snn("sigprop")
    with pytest.raises(ConfigError, match="does not train spiking"):
        snn("dfa")
    with pytest.raises(ConfigError, match="trains spiking networks"):
        build_rule("sp-voltage", build_network("fc-1x8", (4,), 3), 3)
    with pytest.raises(ConfigError, match="spike_threshold"):
        build_rule("backprop", build_network("fc-1x8", (4,), 3), 3, spike_threshold=0.5)
    with pytest.raises(ConfigError, match="mixed-precision"):
        build_rule("sigprop", build_network("fc-1x8", (4,), 3), 3, amp="on")
    with pytest.raises(ConfigError, match="Eq. 1"):
        snn("sp-surrogate", signal="label-input")


def test_thresholds_per_model():
    assert float(snn("bp-surrogate").network.blocks[0].node.threshold) == 1.0
    assert float(snn("shallow").network.blocks[1].node.threshold) == 1.0
    assert float(snn("sp-voltage").network.blocks[2].node.threshold) == 0.5
    assert float(snn("sp-surrogate", spike_threshold=0.8).network.blocks[0].node.threshold) \
        == pytest.approx(0.8)


# ------------------------------------------------------------------ the rules


@pytest.mark.parametrize("rule", MODELS)
def test_each_model_lowers_its_loss(rule):
    lowers_loss(snn(rule, amp="off"), (1, 28, 28), steps=6)


@pytest.mark.parametrize("rule,targets", [("sp-surrogate", "current"),
                                          ("sp-voltage", "current"),
                                          ("sp-surrogate", "input"), ("sp-voltage", "input")])
def test_sigprop_models_are_local(rule, targets):
    """No gradient crosses a block boundary or passes through a spike: every block's
    input is detached spikes (hooks), and a block's gradient equals the one of its own
    loss alone, computed on a copy."""
    r = snn(rule, amp="off", snn_targets=targets)
    seen = []

    def check_input(block, args):
        (x,) = args[:1]
        seen.append(x.requires_grad)

    hooks = [b.synapse.register_forward_pre_hook(check_input) for b in r.network.blocks]
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    r.train_step(x, y)
    for hk in hooks:
        hk.remove()
    # targets at the input: block 1's input is [x, targets], the targets carrying the
    # generator's gradient; as currents they join after block 1's synapse
    assert seen == [targets == "input", False, False]
    # the spikes a block emits during training carry no gradient
    out, charged = r.network.blocks[1].run(torch.rand(4, 5, 128, 14, 14).round(), 3,
                                           detach_carry=True)
    assert not out.requires_grad and charged.requires_grad


SETTINGS = [("sp-surrogate", "surrogate", "input"), ("sp-surrogate", "surrogate-above", "input"),
            ("sp-surrogate", "surrogate", "current"), ("sp-voltage", "voltage", "input"),
            ("sp-voltage", "voltage-above", "current"), ("sp-surrogate", "surrogate-leaky", "current"),
            ("sp-voltage", "voltage-leaky", "current")]


@pytest.mark.parametrize("rule,loss,targets", SETTINGS)
def test_sigprop_block_gradient_is_its_own_loss_only(rule, loss, targets):
    r = snn(rule, amp="off", snn_loss=loss, snn_targets=targets)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    block = r.network.blocks[1]
    with torch.no_grad():
        h, extra = r._inputs_and_targets(x)
        h1, _ = r.network.blocks[0].run(h, 8, detach_carry=True, extra=extra)
    _, charged = block.run(h1, 8, detach_carry=True)
    scores = r._scores(r._activity(charged, block), 8, 1)
    loss = torch.nn.functional.cross_entropy(scores.flatten(0, 1), y.repeat(4))
    want = torch.autograd.grad(loss, block.synapse.weight)[0]
    captured = {}
    block.synapse.weight.register_hook(lambda g: captured.setdefault("g", g.clone()))
    r.train_step(x, y)
    assert torch.allclose(captured["g"], want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rule,loss", [("sp-surrogate", "surrogate-above"),
                                       ("sp-voltage", "voltage-above")])
def test_above_threshold_losses_move_only_neurons_at_or_above_it(rule, loss):
    """Hand-built voltages on both sides of the threshold: the comparison's gradient is
    zero wherever u < theta and reaches every neuron above it."""
    r = snn(rule, amp="off", snn_loss=loss)
    block = r.network.blocks[0]
    theta = float(block.node.threshold)
    u = (theta + torch.linspace(-2.0, 2.0, 4 * 6 * 10).view(4, 6, 10)).requires_grad_(True)
    r._activity(u, block).sum().backward()
    below, above = u.detach() < theta, u.detach() > theta
    assert below.any() and above.any()
    assert (u.grad[below] == 0).all() and (u.grad[above] != 0).all()
    # the paper's comparisons reach the neurons below threshold too
    literal = snn(rule, amp="off")
    u.grad = None
    literal._activity(u, block).sum().backward()
    assert (u.grad[below] != 0).all()


@pytest.mark.parametrize("rule,loss", [("sp-surrogate", "surrogate-leaky"),
                                       ("sp-voltage", "voltage-leaky")])
@pytest.mark.parametrize("slope", [None, 0.1, 0.0])
def test_leaky_losses_move_neurons_below_threshold_at_their_slope(rule, loss, slope):
    """Hand-built voltages: below the threshold the comparison's gradient is the leaky
    slope (the model's own, or snn_leaky_slope) times the slope of its function there (1
    for the voltage, g' for the surrogate); above it, the same as the plain comparison's."""
    r = snn(rule, amp="off", snn_loss=loss, snn_leaky_slope=slope)
    LEAKY_SLOPE = r.leaky_slope if slope is None else slope
    assert r.slope == LEAKY_SLOPE
    block = r.network.blocks[0]
    theta = float(block.node.threshold)
    u = (theta + torch.linspace(-2.0, 2.0, 4 * 6 * 10, dtype=torch.float64)
         .view(4, 6, 10)).requires_grad_(True)
    r._activity(u, block).sum().backward()
    below, above = u.detach() < theta, u.detach() > theta
    if loss == "voltage-leaky":
        assert torch.allclose(u.grad[below], torch.full_like(u.grad[below], LEAKY_SLOPE))
        assert torch.allclose(u.grad[above], torch.ones_like(u.grad[above]))
    else:  # g'(x) = 1 / (1 + (pi x)^2) (Eq. 17 with alpha = 2), at x = slope * (u - theta)
        x = LEAKY_SLOPE * (u.detach()[below] - theta)
        assert torch.allclose(u.grad[below], LEAKY_SLOPE / (1 + (math.pi * x) ** 2))
        x = u.detach()[above] - theta
        assert torch.allclose(u.grad[above], 1 / (1 + (math.pi * x) ** 2))
    assert r.scales[0] > 0


@pytest.mark.parametrize("loss,targets", [("voltage", "input"), ("voltage-above", "input"),
                                          ("voltage-above", "current"),
                                          ("voltage-leaky", "current")])
def test_sp_voltage_has_no_surrogate_anywhere(loss, targets):
    """Every node of sp-voltage's loss graphs: no arctan surrogate (forward or backward)."""
    r = snn("sp-voltage", amp="off", snn_loss=loss, snn_targets=targets)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    names = set()
    for i, block in enumerate(r.network.blocks):
        with torch.no_grad():
            h, extra = r._inputs_and_targets(x)
            for b in r.network.blocks[:i]:
                h, _ = b.run(h, 6, detach_carry=True, extra=extra if b is r.network.blocks[0]
                             else None)
        _, charged = block.run(h, 6, detach_carry=True, extra=extra if i == 0 else None)
        loss_ = r._local_loss(r._scores(r._activity(charged, block), 6, i), y)
        names |= graph_names(loss_)
    assert names and not [n for n in names if "Surrogate" in n or "Atan" in n], names
    assert [n for n in snn_graph_names("sp-surrogate") if "Surrogate" in n]  # the check bites


def snn_graph_names(rule: str) -> set[str]:
    r = snn(rule, amp="off")
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    h, extra = r._inputs_and_targets(x)
    block = r.network.blocks[0]
    _, charged = block.run(h, 6, detach_carry=True, extra=extra)
    return graph_names(r._local_loss(r._scores(r._activity(charged, block), 6, 0), y))


def graph_names(loss: torch.Tensor) -> set[str]:
    """The class names of every node of ``loss``'s autograd graph."""
    seen, stack = {}, [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and id(fn) not in seen:
            seen[id(fn)] = type(fn).__name__
            stack += [f for f, _ in fn.next_functions]
    return set(seen.values())


def test_snn_options_are_checked_per_model():
    with pytest.raises(ConfigError, match="sp-voltage stays surrogate-free"):
        snn("sp-voltage", snn_loss="surrogate")
    with pytest.raises(ConfigError, match="arctan surrogate"):
        snn("sp-surrogate", snn_loss="voltage-above")
    with pytest.raises(ConfigError, match="snn_targets"):
        snn("sp-surrogate", snn_targets="output")
    with pytest.raises(ConfigError, match="snn_logit_c and logit_scale"):
        snn("sp-surrogate", snn_logit_c=4.0, logit_scale=0.01)
    with pytest.raises(ConfigError, match="snn_logit_c"):
        snn("sp-voltage", snn_logit_c=0.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="snn_leaky_slope"):
            snn("sp-voltage", snn_leaky_slope=bad)


def test_snn_logit_c_scales_every_block_by_its_size():
    base = snn("sp-surrogate", snn_loss="surrogate-leaky")
    four = snn("sp-surrogate", snn_loss="surrogate-leaky", snn_logit_c=4.0)
    assert len(base.scales) == len(four.scales) == 3
    for a, b in zip(base.scales, four.scales):
        assert b == pytest.approx(a * 4.0 / base.scale_c_by_compare.get("surrogate-leaky", 1.0))
    assert len(set(four.scales)) == 3  # each block its own d


def test_a_runs_settings_are_written_into_its_config_and_old_records_keep_theirs(tmp_path,
                                                                            fake_fashion,
                                                                            capsys):
    """A new run's config holds the settings it ran (printed at its start), so later
    defaults cannot change it; a record from before (settings unset) reads as the
    literal reading it ran."""
    from sigprop.engine.config import config_from_dict

    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(fake_fashion), "--network", "snn-conv", "--rule",
                 "sp-surrogate", "--train-limit", "32", "--test-limit", "32", "--batch-size",
                 "32", "--epochs", "1", "--run-dir", str(run), "--no-progress"]) == 0
    from sigprop.rules.spiking import SPSurrogate

    assert ("rule.snn_loss surrogate, rule.snn_targets current, rule.snn_leaky_slope "
            f"{SPSurrogate.leaky_slope}") in capsys.readouterr().out
    recorded = json.loads((run / "config.json").read_text())["config"]
    assert (recorded["rule"]["snn_loss"], recorded["rule"]["snn_targets"],
            recorded["rule"]["snn_leaky_slope"]) == ("surrogate", "current",
                                                     SPSurrogate.leaky_slope)
    for name, literal in (("sp-surrogate", "surrogate"), ("sp-voltage", "voltage")):
        old = {**recorded, "rule": {**recorded["rule"], "name": name, "snn_loss": None,
                                    "snn_targets": None}}
        del old["rule"]["snn_leaky_slope"]
        opts = config_from_dict(old).rule.options
        # before the slope was an option the leaky comparisons ran 0.01
        assert (opts["snn_loss"], opts["snn_targets"], opts["snn_leaky_slope"]) == (
            literal, "input", 0.01)
    # a resume keeps them; a later default change would not reach this run
    assert main(["train", "--data-dir", str(fake_fashion), "--run-dir", str(run), "--resume",
                 "--epochs", "2", "--no-progress"]) == 0


def test_amp_bf16_on_cpu_and_off():
    r = snn("sp-surrogate", amp="on")
    assert r.amp_on(torch.device("cpu"))
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    losses, _ = r.train_step(x, y)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert r.predict(x).dtype == torch.float32
    assert not snn("sp-surrogate", amp="off").amp_on(torch.device("cpu"))
    assert not build_rule("backprop", build_network("fc-1x8", (4,), 3), 3).amp_on(
        torch.device("cpu"))


@pytest.mark.parametrize("native,faster,want", [
    (False, None, "float32 (amp auto: this CPU (AVX2) has no native bf16"),
    (True, 1.4, "bf16 autocast (amp auto: this CPU (AVX512) has native bf16; a timed conv "
                "ran 1.40x as fast"),
    (True, 1.02, "float32 (amp auto: this CPU (AVX512) has native bf16; a timed conv ran "
                 "1.02x as fast under bf16 autocast, not enough to pay"),
])
def test_amp_auto_chooses_16_bit_only_where_it_pays(monkeypatch, native, faster, want):
    """amp auto on a CPU: bf16 only with native bf16 arithmetic and a faster timed conv
    (on an AVX2 CPU emulated bf16 convolutions ran 33x slower); the timing is skipped
    where the capability is missing."""
    from sigprop import resources

    monkeypatch.setattr(resources, "_HALF", {})
    monkeypatch.setattr(resources, "cpu_bf16", lambda: native)
    monkeypatch.setattr(resources.torch.backends.cpu, "get_cpu_capability",
                        lambda: "AVX512" if native else "AVX2")
    timed = []
    monkeypatch.setattr(resources, "_bf16_speedup", lambda: timed.append(1) or faster)
    r = snn("sp-surrogate")
    assert r.precision("cpu").startswith(want)
    assert r.amp_on(torch.device("cpu")) == (want.startswith("bf16"))
    assert timed == ([1] if native else [])
    assert snn("sp-surrogate", amp="on").precision("cpu") == "bf16 autocast (amp on)"
    assert snn("sp-surrogate", amp="off").precision("cpu") == "float32 (amp off)"


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path, fake_fashion,
                                                          monkeypatch, capsys):
    """amp auto decides once, at the run's start: a resume keeps that arithmetic even
    where a timing on a busy machine would now decide otherwise."""
    from sigprop import resources

    monkeypatch.setattr(resources, "cpu_bf16", lambda: True)
    run = tmp_path / "run"
    args = ["train", "--data-dir", str(fake_fashion), "--network", "snn-conv", "--rule",
            "sp-voltage", "--train-limit", "64", "--test-limit", "64", "--batch-size", "32",
            "--run-dir", str(run), "--no-progress"]
    for speedup, epochs in ((1.5, 1), (0.2, 2)):
        monkeypatch.setattr(resources, "_HALF", {})
        monkeypatch.setattr(resources, "_bf16_speedup", lambda s=speedup: s)
        assert main([*args, "--epochs", str(epochs), *(["--resume"] if epochs > 1 else [])]) == 0
    out = capsys.readouterr().out
    assert "ran 1.50x as fast under bf16 autocast) (kept from the run's start)" in out
    assert json.loads((run / "config.json").read_text())["precision"].startswith(
        "bf16 autocast (amp auto")
    r = snn("sp-voltage")
    assert not r.keep_precision("fp16 autocast (amp auto: CUDA computes fp16 natively)", "cpu")
    assert not snn("sp-voltage", amp="off").keep_precision("bf16 autocast (amp auto: x)", "cpu")
    assert r.keep_precision("float32 (amp auto: x)", "cpu") and not r.amp_on(torch.device("cpu"))


def test_spike_rates_in_epoch_metrics():
    r = snn("sp-voltage", amp="off")
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    r.train_step(x, y)
    rates = r.epoch_metrics()["spike_rate"]
    assert set(rates) == {"layer1", "layer2", "layer3"}
    assert all(0.0 <= v <= 1.0 for v in rates.values())
    assert r.epoch_metrics() == {}


def test_cli_trains_and_resumes_an_snn(tmp_path, fake_fashion):
    run = tmp_path / "run"
    args = ["train", "--data-dir", str(fake_fashion), "--network", "snn-conv", "--rule",
            "sp-voltage", "--train-limit", "64",
            "--test-limit", "64", "--batch-size", "32", "--run-dir", str(run), "--no-progress"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert set(records[-1]["spike_rate"]) == {"layer1", "layer2", "layer3"}
    assert main(["eval", str(run), "--data-dir", str(fake_fashion)]) == 0


def test_snn_probe_script_probes_every_block(tmp_path, fake_fashion):
    """scripts/snn_probe.py on a trained run: one probe line per block and feature set;
    a missing run is one line and exit 2."""
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(fake_fashion), "--network", "snn-conv", "--rule",
                 "sp-surrogate", "--train-limit", "64", "--test-limit", "64", "--batch-size",
                 "32", "--epochs", "1", "--run-dir", str(run), "--no-progress"]) == 0
    script = Path(__file__).resolve().parents[1] / "scripts" / "snn_probe.py"
    out = subprocess.run([sys.executable, str(script), str(run), "--train-limit", "64",
                          "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # blocks 1-3 spikes, blocks 2-3 voltages (block 1's voltages are skipped)
    assert len(lines) == 5 and all("probe train" in line for line in lines), lines
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "no checkpoint" in bad.stderr


# ------------------------------------------------------------------ real data


def _slice_accuracy(tmp_path, rule: str, images: int, seed: int = 0) -> float:
    """Test accuracy (first 2,000 test images) after one epoch on the first ``images``
    real Fashion-MNIST images, the rule's defaults otherwise."""
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    run = tmp_path / f"{rule}-{images}-s{seed}"
    assert main(["train", "--network", "snn-conv", "--rule", rule, "--train-limit", str(images),
                 "--test-limit", "2000", "--epochs", "1", "--seed", str(seed), "--run-dir",
                 str(run), "--no-progress"]) == 0
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]


@pytest.mark.slow
def test_both_sp_models_beat_shallow_on_a_small_slice_every_seed(tmp_path):
    """sp-surrogate and sp-voltage with their defaults each beat Shallow after one epoch
    of the first 3,000 real images (24 steps), seeds 0-2 (measured: sp-surrogate 0.7355 /
    0.6965 / 0.7500, sp-voltage 0.722 / 0.697 / 0.7625, Shallow 0.6680 / 0.6790 / 0.7065;
    docs/studies/spiking-local-loss.md, "A faster start" and "SP voltage's slope")."""
    for seed in (0, 1, 2):
        shallow = _slice_accuracy(tmp_path, "shallow", 3_000, seed)
        for rule in ("sp-surrogate", "sp-voltage"):
            acc = _slice_accuracy(tmp_path, rule, 3_000, seed)
            assert acc > shallow, (rule, seed, acc, shallow)


def test_table5_named_configs():
    from sigprop.experiments import load_experiment

    for name, dataset in (("table5-snn-fmnist", "fashion-mnist"), ("table5-snn-mnist", "mnist")):
        exp = load_experiment(name)
        full = exp.runs("full")
        assert {p.config.rule.name for p in full} == set(MODELS)
        for p in full:
            c = p.config
            assert (c.model.network, c.data.dataset, c.data.batch_size) == ("snn-conv", dataset, 128)
            assert (c.train.epochs, c.train.schedule, c.rule.lr) == (64, "cosine", 5e-4)
            assert c.rule.amp == "auto"
        # the defaults and the literal readings, each column's settings stated
        settings = {p.column.key: (p.config.rule.options["snn_loss"],
                                   p.config.rule.options["snn_targets"])
                    for p in full if p.config.rule.name.startswith("sp-")}
        assert settings == {"sp-surrogate": ("surrogate", "current"),
                            "sp-voltage": ("voltage-leaky", "current"),
                            "sp-surrogate-literal": ("surrogate", "input"),
                            "sp-voltage-literal": ("voltage", "input")}
        defaults = {r: snn(r, amp="off") for r in ("sp-surrogate", "sp-voltage")}
        assert {r: (d.compare, d.targets_in) for r, d in defaults.items()} == {
            "sp-surrogate": settings["sp-surrogate"], "sp-voltage": settings["sp-voltage"]}
        # the slope of SP voltage's column is its default's, stated
        slope = {p.column.key: p.config.rule.options["snn_leaky_slope"] for p in full
                 if p.column.key == "sp-voltage"}
        assert slope == {"sp-voltage": 0.1} and defaults["sp-voltage"].slope == 0.1


def test_snn_builds_on_the_meta_device():
    """Reproductions plan runs on the meta device: no autocast query may fail there."""
    with torch.device("meta"):
        net = build_network("snn-conv", (1, 28, 28), 10)
    assert net.block_shapes[-1] == (4, 2048)


def test_fa_trains_a_spiking_net_in_16_bits():
    """FA through the spikes' surrogate under 16-bit autocast: its backward takes the
    16-bit gradient with the 32-bit saved input and feedback matrix (was a dtype error),
    and the weights get 32-bit gradients."""
    r = snn("fa", amp="on")
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4) % 10
    before = [p.detach().clone() for p in r.network.parameters()]
    losses, _ = r.train_step(x, y)
    assert torch.isfinite(losses).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, r.network.parameters()))
    assert all(p.dtype == torch.float32 for p in r.network.parameters())


def test_spiking_refusal_names_the_rules_that_train_them():
    from sigprop.registry import RULES

    with pytest.raises(ConfigError) as err:
        snn("dfa")
    for name, cls in RULES.items():
        if cls.trains_spiking:
            assert name in str(err.value)
