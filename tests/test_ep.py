"""Equilibrium propagation on continuous Hopfield networks (Sec. V): the batched dynamics
and updates against per-sample loops, fixed points, Eq. 14, the limit beta -> 0, the
alignment metric on matrices of known angles, and learning on real Fashion-MNIST."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sigprop  # noqa: F401  (registers the EP rules)
import sigprop.engine.trainer  # noqa: F401  (bind Trainer before tests capture stdout)
from sigprop.cli import main
from sigprop.errors import ConfigError
from sigprop.functional import ep as EP
from sigprop.networks import build_network
from sigprop.rules import build_rule

CLASSES = 3


def tiny(rule="ep-loopback", arch="2x5", seed=0, **kw):
    torch.manual_seed(seed)
    return build_rule(rule, build_network(f"hopfield-{arch}", (4,), CLASSES), CLASSES, **kw)


def ref_relax(rule, x, steps, beta=0.0, target=None, states=None):
    """The dynamics one sample at a time, every sum written out (Eq. 13, r = 1)."""
    lins = rule.linears
    loop = getattr(rule.extra, "linear", None)
    symmetric = rule.name == "ep-symmetric"
    out = []
    for n in range(x.shape[0]):
        s = [torch.zeros(lin.out_features, dtype=x.dtype) for lin in lins] if states is None \
            else [st[n].clone() for st in states]
        for _ in range(steps):
            new = []
            for i, lin in enumerate(lins):
                src = x[n] if i == 0 else s[i - 1].clamp(0, 1)
                d = lin.bias.clone()
                for j in range(lin.out_features):
                    d[j] += sum(lin.weight[j, k] * src[k] for k in range(lin.in_features))
                if i == 0 and loop is not None:  # the loop-back from the output
                    for j in range(lin.out_features):
                        d[j] += sum(loop.weight[j, k] * s[-1][k].clamp(0, 1)
                                    for k in range(CLASSES))
                if symmetric and i + 1 < len(lins):  # the layer above through the same W
                    up = lins[i + 1]
                    for j in range(lin.out_features):
                        d[j] += sum(up.weight[k, j] * s[i + 1][k].clamp(0, 1)
                                    for k in range(up.out_features))
                ds = d - s[i]
                if beta and i == len(lins) - 1:
                    ds = ds - beta * (s[i] - target[n])
                new.append((s[i] + rule.opts.ep_dt * ds).clamp(0, 1))
            s = new
        out.append(s)
    return [torch.stack([o[i] for o in out]) for i in range(len(lins))]


@pytest.mark.parametrize("rule_name", ["ep-loopback", "ep-symmetric"])
def test_batched_dynamics_equal_the_per_sample_loop(rule_name, float64):
    rule = tiny(rule_name)
    x = torch.rand(4, 4)
    target = torch.eye(CLASSES)[torch.tensor([0, 2, 1, 0])]
    free, _ = rule.relax(x, 7)
    ref = ref_relax(rule, x, 7)
    for a, b in zip(free, ref):
        torch.testing.assert_close(a, b)
    nudged, _ = rule.relax(x, 3, list(free), 0.7, target)
    for a, b in zip(nudged, ref_relax(rule, x, 3, 0.7, target, ref)):
        torch.testing.assert_close(a, b)


def test_hebbian_and_contrastive_updates_equal_their_formulas(float64):
    pre0, post0, postb, preb = (torch.rand(5, 4), torch.rand(5, 3), torch.rand(5, 3),
                                torch.rand(5, 4))
    beta = 0.3
    dW, db = EP.hebbian_update(pre0, post0, postb, beta)
    for i in range(4):
        for j in range(3):  # Eq. 14: (1/beta) rho(s_i^0)(rho(s_j^b) - rho(s_j^0)), averaged
            want = sum(pre0[n, i] * (postb[n, j] - post0[n, j]) for n in range(5)) / (5 * beta)
            assert abs(dW[i, j] - want) < 1e-12
    torch.testing.assert_close(db, (postb - post0).mean(0) / beta)
    dW, db = EP.contrastive_update(pre0, post0, preb, postb, beta)
    torch.testing.assert_close(dW, (preb.T @ postb - pre0.T @ post0) / (5 * beta))


def test_rule_step_applies_eq14_to_every_weight_and_bias_and_the_loop(float64):
    rule = tiny(ep_lrs="0.1,0.1,0.1,0.1")
    before = [p.clone() for p in rule.modules.parameters()]
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    rule.set_training(True)
    torch.manual_seed(3)
    free, _ = rule.relax(x, rule.free_steps)
    nudged, _ = rule.relax(x, rule.nudge_steps, list(free), rule.beta,
                           torch.eye(CLASSES)[y])
    rule.train_step(x, y)
    pres = [x, free[0], free[1]]
    for lin, pre, f, b, w0 in zip(rule.linears, pres, free, nudged, before[0::2]):
        dW, _ = EP.hebbian_update(pre, f, b, rule.beta)
        torch.testing.assert_close(lin.weight, w0 + 0.1 * dW.T)
    dW, _ = EP.hebbian_update(free[-1], free[0], nudged[0], rule.beta)
    loop0 = before[6]
    torch.testing.assert_close(rule.extra.linear.weight, loop0 + 0.1 * dW.T)


def test_symmetric_dynamics_descend_the_energy(float64):
    """ep-symmetric: one Euler step is minus the energy's gradient with respect to the
    states (inside [0, 1], where the clip does nothing), free and nudged, with inputs of
    either sign (as the dynamics take them, unclipped)."""
    rule = tiny("ep-symmetric", arch="2x6")
    weights, biases = rule._weights()
    x = torch.randn(5, 4)  # standardised inputs: negative values reach the drive as they are
    target = torch.eye(CLASSES)[torch.tensor([0, 1, 2, 0, 1])]
    for beta in (0.0, 0.8):
        states = [torch.empty(5, lin.out_features).uniform_(0.2, 0.8) for lin in rule.linears]
        leaves = [s.clone().requires_grad_(True) for s in states]
        EP.energy(leaves, x, weights, biases, beta, target).sum().backward()
        dt = 1e-3  # small enough that no unit leaves [0, 1]
        drives = rule._drives(states, x)
        new, _ = EP.euler_step(states, drives, dt, beta, target)
        for s, s2, leaf in zip(states, new, leaves):
            torch.testing.assert_close((s2 - s) / dt, -leaf.grad)


def test_symmetric_update_is_the_energy_gradient_difference(float64):
    """ep-symmetric's update is minus the difference, over beta, of the energy's
    gradients with respect to each weight and bias between the nudged and the free
    states (the input entering as the dynamics take it)."""
    rule = tiny("ep-symmetric", arch="2x6")
    x = torch.randn(5, 4)
    beta = 0.6
    free = [torch.rand(5, lin.out_features) for lin in rule.linears]
    nudged = [torch.rand(5, lin.out_features) for lin in rule.linears]
    grads = []
    for states in (free, nudged):
        ws = [lin.weight.T.detach().clone().requires_grad_(True) for lin in rule.linears]
        bs = [lin.bias.detach().clone().requires_grad_(True) for lin in rule.linears]
        EP.energy(states, x, ws, bs).mean().backward()
        grads.append(([w.grad for w in ws], [b.grad for b in bs]))
    for i in range(len(rule.linears)):
        dW, db = EP.contrastive_update(EP.activity(free, x, i), free[i],
                                       EP.activity(nudged, x, i), nudged[i], beta)
        torch.testing.assert_close(dW, -(grads[1][0][i] - grads[0][0][i]) / beta)
        torch.testing.assert_close(db, -(grads[1][1][i] - grads[0][1][i]) / beta)


@pytest.mark.parametrize("rule_name", ["ep-loopback", "ep-symmetric"])
def test_each_update_reads_the_activity_its_drive_read(rule_name, float64):
    """Every Hebbian term uses the presynaptic values that produced the states: the input
    as it enters the first layer's drive (negative standardised pixels included), rho of
    the layer below elsewhere, rho of the output for the loop-back."""
    rule = tiny(rule_name, ep_lrs=",".join(["0.1"] * (4 if rule_name == "ep-loopback" else 3)),
                ep_beta_sign="random")
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    before = [lin.weight.clone() for lin in rule.linears]
    torch.manual_seed(3)
    free, _ = rule.relax(x, rule.free_steps)
    sign = rule.beta
    if rule.sign == "random" and bool(torch.randint(0, 2, ()).item()):
        sign = -sign
    nudged, _ = rule.relax(x, rule.nudge_steps, list(free), sign, torch.eye(CLASSES)[y])
    rule.set_training(True)
    torch.manual_seed(3)
    rule.train_step(x, y)
    first = before[0] + 0.1 * (
        EP.hebbian_update(x, free[0], nudged[0], sign)[0] if rule_name == "ep-loopback"
        else EP.contrastive_update(x, free[0], x, nudged[0], sign)[0]).T
    torch.testing.assert_close(rule.linears[0].weight, first)
    assert (x < 0).any()  # the clip would have changed these


def test_fixed_loopback_never_moves():
    rule = tiny(loopback="fixed")
    w = rule.extra.linear.weight.clone()
    rule.set_training(True)
    for _ in range(3):
        rule.train_step(torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.equal(w, rule.extra.linear.weight)


@pytest.mark.parametrize("rule_name", ["ep-loopback", "ep-symmetric"])
def test_free_phase_reaches_a_fixed_point(rule_name, float64):
    rule = tiny(rule_name, ep_tol=1e-8)
    _, residual = rule.relax(torch.rand(5, 4), 2000, tol=1e-8)
    assert float(residual.max()) < 1e-8


def test_update_as_beta_goes_to_zero(float64):
    """On a converged free state the nudged state moves O(beta): the change vanishes and
    the update (change / beta) converges."""
    rule = tiny()
    x, target = torch.rand(5, 4), torch.eye(CLASSES)[torch.tensor([0, 1, 2, 0, 1])]
    free, _ = rule.relax(x, 2000)
    updates, changes = [], []
    for beta in (1e-2, 1e-3, 1e-4):
        nudged, _ = rule.relax(x, 30, list(free), beta, target)
        changes.append(max(float((b - f).abs().max()) for f, b in zip(free, nudged)))
        updates.append(EP.hebbian_update(x, free[0], nudged[0], beta)[0])
    assert changes[2] < changes[1] < changes[0] and changes[2] < 1e-3
    assert (updates[1] - updates[2]).abs().max() < 0.05 * updates[2].abs().max() + 1e-9


def test_alignment_angles_on_matrices_of_known_angle(float64):
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert EP.matrix_angle(a, a) == pytest.approx(0.0, abs=1e-6)
    assert EP.matrix_angle(a, torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == pytest.approx(90.0)
    assert EP.matrix_angle(a, torch.tensor([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(45.0)
    assert EP.matrix_angle(a, -a) == pytest.approx(180.0)
    rows = EP.row_angles(torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                         torch.tensor([[0.0, 2.0], [1.0, 1.0]]))
    torch.testing.assert_close(rows, torch.tensor([90.0, 45.0]))
    # around the loop: W1 (h1 -> h2), W2 (h2 -> out), W3 (out -> h1); W3 W1 ~ W2ᵀ
    rule = tiny(arch="2x3")
    assert rule.alignment_names() == ["W1~W2W3", "W2~W3W1", "W3~W1W2"]
    with torch.no_grad():
        W1, W3 = torch.randn(3, 3), torch.randn(3, 3)  # (in, out): h1->h2, out->h1
        rule.linears[1].weight.copy_(W1.T)
        rule.extra.linear.weight.copy_(W3.T)
        rule.linears[2].weight.copy_(W3 @ W1)  # W2 (in, out) = (W3 W1)ᵀ: aligned
    assert rule.frobenius_alignment()["W2~W3W1"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        rule.linears[2].weight.copy_(-(W3 @ W1))
    assert rule.frobenius_alignment()["W2~W3W1"] == pytest.approx(180.0, abs=1e-5)


def test_ep_rules_need_a_hopfield_network_and_valid_options():
    with pytest.raises(ConfigError, match="trains continuous Hopfield networks"):
        build_rule("ep-loopback", build_network("fc-2x8", (4,), CLASSES), CLASSES)
    with pytest.raises(ConfigError, match="ep_lrs must list 4"):
        tiny(ep_lrs="0.1,0.1")
    for bad in ("1e39,0.1,0.1,0.1", "0.1,0.1,0.1,inf", "0.1,0.1,0.1,0"):  # 1e39: no float32
        with pytest.raises(ConfigError, match="ep_lrs must list 4"):
            tiny(ep_lrs=bad)
    with pytest.raises(ConfigError, match="loopback"):
        tiny(loopback="sometimes")
    with pytest.raises(ConfigError, match="dropout"):
        build_network("hopfield-1x8", (4,), CLASSES, dropout=0.1)


def test_symmetric_default_rates_are_scellier_bengios_scaled_to_the_width():
    """Their rates are for 500-unit layers; wider layers get them x 500 / width."""
    def lrs(arch):
        rule = build_rule("ep-symmetric", build_network(f"hopfield-{arch}", (4,), CLASSES),
                          CLASSES)
        return [g["lr"] for g in rule.optimizer.param_groups]
    assert lrs("2x500") == pytest.approx([0.4, 0.1, 0.01])
    assert lrs("2x256") == pytest.approx([0.4, 0.1, 0.01])
    assert lrs("2x1500") == pytest.approx([0.4 / 3, 0.1 / 3, 0.01 / 3])
    assert lrs("1x1000") == pytest.approx([0.05, 0.025])


def test_symmetric_default_phases_follow_scellier_bengio_per_depth():
    """Their steps per depth; beta 1 and a centered nudge at every depth (measured:
    docs/studies/equilibrium-propagation.md)."""
    def phases(arch):
        r = build_rule("ep-symmetric", build_network(f"hopfield-{arch}", (4,), CLASSES),
                       CLASSES)
        assert r.sign == "centered"
        return r.free_steps, r.nudge_steps, r.beta
    assert phases("1x8") == (60, 4, 1.0)
    assert phases("2x8") == (150, 6, 1.0)
    assert phases("3x8") == (500, 8, 1.0)
    r = build_rule("ep-symmetric", build_network("hopfield-2x8", (4,), CLASSES), CLASSES,
                   ep_free_steps=30, ep_beta=0.25)
    assert (r.free_steps, r.nudge_steps, r.beta) == (30, 6, 0.25)


def fashion_or_skip():
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except Exception:  # noqa: BLE001
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize("rule_name,floor", [("ep-loopback", 0.74), ("ep-symmetric", 0.70)])
def test_ep_learns_fashion_mnist(rule_name, floor, tmp_path):
    """hopfield-1x256, two epochs of 5,000 Fashion-MNIST images, the rules' own defaults
    (no other flag): both above 70%; ep-loopback logs its alignment every epoch."""
    fashion_or_skip()
    run = tmp_path / "run"
    assert main(["train", "--rule", rule_name, "--network", "hopfield-1x256", "--train-limit",
                 "5000", "--epochs", "2", "--run-dir", str(run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_acc"] > floor, records[-1]["test_acc"]
    if rule_name == "ep-loopback":
        for r in records:
            angles = r["alignment_deg"]
            assert set(angles) == {"W1~W2", "W2~W1"}
            assert all(math.isfinite(v) for v in angles.values())
            assert set(r["alignment_frobenius_deg"]) == set(angles)


def test_persistent_particles_start_each_sample_where_it_settled(float64):
    """With ep_persistent, a sample's free phase starts from its last fixed point: a
    second pass over the same samples needs fewer steps to settle (with ep_tol)."""
    rule = tiny("ep-symmetric", arch="1x8", ep_persistent="on", ep_tol=1e-6,
                ep_free_steps=400, ep_lrs="1e-9,1e-9")  # weights all but still
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    index = torch.tensor([5, 3, 9, 0, 1, 2])
    rule.set_training(True)
    rule.train_step(x, y, index)
    first = rule.last_free_steps
    settled = [p[index].clone() for p in rule.particles]
    rule.train_step(x, y, index)
    assert first > 10 and rule.last_free_steps == 10  # settled at the first check
    assert rule.particles[0].shape[0] >= 10  # grown to the largest position
    fresh = tiny("ep-symmetric", arch="1x8", ep_persistent="on", ep_tol=1e-6,
                 ep_free_steps=400)
    fresh.set_training(True)
    fresh.train_step(x, y)  # no index: from zero, nothing kept
    assert fresh.particles == []
    assert all(torch.isfinite(s).all() for s in settled)


def test_rule_defaults_apply_to_new_runs_and_yield_to_the_user():
    """EP's own batch size, schedule and inputs; a flag or a file wins; other rules keep
    the engine's defaults."""
    from sigprop.engine.config import compose

    ep = compose(({"rule": {"name": "ep-loopback"}}, True))
    assert (ep.data.batch_size, ep.train.schedule, ep.data.inputs) == (20, "none", "standard")
    mine = compose(({"data": {"batch_size": 64, "inputs": "unit"}}, False),
                   ({"rule": {"name": "ep-symmetric"}, "train": {"schedule": "step"}}, True))
    assert (mine.data.batch_size, mine.train.schedule, mine.data.inputs) == (64, "step", "unit")
    sp = compose(({"rule": {"name": "sigprop"}}, True))
    assert (sp.data.batch_size, sp.train.schedule, sp.data.inputs) == (128, "step", "standard")


def test_inputs_reach_the_network_as_chosen(fake_fashion):
    """standard: the dataset's mean and std (every rule's default, the EP rules' included);
    unit: pixels in [0, 1], when asked for."""
    from sigprop.engine.config import compose
    from sigprop.engine.trainer import build_experiment

    for rule, inputs in (("ep-loopback", None), ("ep-symmetric", "unit"), ("backprop", None)):
        net = "hopfield-1x16" if rule.startswith("ep") else "fc-1x16"
        data = {"data_dir": str(fake_fashion), "train_limit": 64}
        if inputs:
            data["inputs"] = inputs
        cfg = compose(({"rule": {"name": rule}, "model": {"network": net}, "data": data},
                       False))
        x, _ = next(iter(build_experiment(cfg).train.epoch(0)))
        if inputs == "unit":
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        else:  # standardised: the dark pixels below zero, the bright ones above 1
            assert float(x.min()) < 0 and float(x.max()) > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("network", ["hopfield-1x1500", "hopfield-2x500"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetric_output_layer_stays_alive_on_a_wide_net(network, seed, tmp_path):
    """A wide net and a deep one on 1,000 Fashion-MNIST images, the rule's defaults: the
    samples whose outputs are all zero stay a minority (with the one-sided nudge, or pixels
    in [0, 1] on the deep net, they took over) and the net learns."""
    fashion_or_skip()
    run = tmp_path / "run"
    assert main(["train", "--rule", "ep-symmetric", "--network", network,
                 "--train-limit", "1000", "--test-limit", "2000", "--epochs", "1",
                 "--seed", str(seed), "--run-dir", str(run), "--no-progress"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["dead_outputs"] < 0.5 and record["test_acc"] > 0.4, record


def test_a_dying_output_layer_is_warned_about(capsys, tmp_path, fake_fashion, monkeypatch):
    from sigprop.rules.equilibrium import EquilibriumPropagation

    real = EquilibriumPropagation.epoch_metrics
    monkeypatch.setattr(EquilibriumPropagation, "epoch_metrics",
                        lambda self: {**real(self), "dead_outputs": 0.75})
    assert main(["train", "--rule", "ep-loopback", "--network", "hopfield-1x16",
                 "--data-dir", str(fake_fashion), "--train-limit", "100", "--epochs", "1",
                 "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sigprop: warning: epoch 1: 75% of the training samples ended the free "
                   "phase with every output unit at zero, where the updates vanish: the "
                   "output layer is dying; lower the rates (--ep-lrs) or --ep-beta"]


@pytest.mark.slow
@pytest.mark.parametrize("rule_name,floor", [("ep-loopback", 0.74), ("ep-symmetric", 0.70)])
@pytest.mark.parametrize("seed", [1, 2])
def test_ep_learns_fashion_mnist_on_every_seed(rule_name, floor, seed, tmp_path):
    """The slice of the default-suite test above on seeds 1 and 2."""
    fashion_or_skip()
    run = tmp_path / "run"
    assert main(["train", "--rule", rule_name, "--network", "hopfield-1x256", "--train-limit",
                 "5000", "--epochs", "2", "--seed", str(seed), "--run-dir", str(run),
                 "--no-progress"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test_acc"] >= floor, record["test_acc"]
