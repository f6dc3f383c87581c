"""The paper's equations (sigprop.functional) and target generators (sigprop.signals)
against slow, obviously correct Python-loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sigprop.functional as SF
from sigprop.errors import ConfigError
from sigprop.signals import Feedback, build_signal

DT = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def leaky(v: float) -> float:
    return v if v >= 0 else 0.01 * v


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# --------------------------------------------------------------------------- comparisons


def loop_dot(h, t, scale=1.0):
    h, t = h.flatten(1), t.flatten(1)
    out = torch.zeros(h.shape[0], t.shape[0], dtype=DT)
    for i in range(h.shape[0]):
        for j in range(t.shape[0]):
            out[i, j] = sum(float(h[i, k]) * float(t[j, k]) for k in range(h.shape[1])) * scale
    return out


def loop_l2(h, t, scale=1.0):
    """Eq. 7 as a similarity: -sum_k (t_jk - h_ik)^2."""
    h, t = h.flatten(1), t.flatten(1)
    out = torch.zeros(h.shape[0], t.shape[0], dtype=DT)
    for i in range(h.shape[0]):
        for j in range(t.shape[0]):
            out[i, j] = -sum((float(t[j, k]) - float(h[i, k])) ** 2
                             for k in range(h.shape[1])) * scale
    return out


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_dot_compare_matches_loop(scale):
    h, t = rand(5, 7, seed=1), rand(3, 7, seed=2)
    out = SF.dot_compare(h, t, scale)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, loop_dot(h, t, scale))
    torch.testing.assert_close(SF.compare(h, t, "dot", scale), out)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_l2_compare_matches_loop(scale):
    h, t = rand(6, 5, seed=3), rand(4, 5, seed=4)
    out = SF.l2_compare(h, t, scale)
    assert out.shape == (6, 4)
    torch.testing.assert_close(out, loop_l2(h, t, scale))
    torch.testing.assert_close(SF.compare(h, t, "l2", scale), out)
    # a similarity: never positive, zero exactly for identical rows
    assert (out <= 1e-12).all()
    assert abs(float(SF.l2_compare(h[:1], h[:1])[0, 0])) < 1e-12


def test_compare_flattens_image_shaped_rows():
    h, t = rand(4, 2, 3, 3, seed=5), rand(3, 2, 3, 3, seed=6)
    torch.testing.assert_close(SF.dot_compare(h, t), loop_dot(h, t))
    torch.testing.assert_close(SF.l2_compare(h, t), loop_l2(h, t))


def test_compare_unknown_kind():
    with pytest.raises(ValueError, match="cosine"):
        SF.compare(rand(2, 3), rand(2, 3), "cosine")
    with pytest.raises(ValueError, match="cosine"):
        SF.compare_paired(rand(2, 3), rand(2, 4, 3), "cosine")


@pytest.mark.parametrize("kind", ["dot", "l2"])
def test_compare_paired_matches_loop(kind):
    n, m, d = 5, 3, 4
    h, t = rand(n, d, seed=7), rand(n, m, d, seed=8)
    out = SF.compare_paired(h, t, kind, 0.5)
    ref = torch.zeros(n, m, dtype=DT)
    for i in range(n):
        for j in range(m):
            if kind == "dot":
                ref[i, j] = sum(float(h[i, k]) * float(t[i, j, k]) for k in range(d)) * 0.5
            else:
                ref[i, j] = -sum((float(h[i, k]) - float(t[i, j, k])) ** 2 for k in range(d)) * 0.5
    torch.testing.assert_close(out, ref)
    # paired comparison of sample i = row i of the all-pairs comparison against its own targets
    for i in range(n):
        torch.testing.assert_close(out[i], SF.compare(h[i:i + 1], t[i], kind, 0.5)[0])


def test_default_scale():
    assert SF.default_scale("dot", 1000) == pytest.approx(4 / math.sqrt(1000))
    assert SF.default_scale("dot", 16) == pytest.approx(1.0)
    assert SF.default_scale("l2", 1000) == pytest.approx(2 / math.sqrt(1000))
    assert SF.default_scale("l2", 16) == pytest.approx(0.5)
    assert SF.default_scale("dot", 16, per_sample=True) == pytest.approx(0.25)
    assert SF.default_scale("l2", 16, per_sample=True) == pytest.approx(0.125)
    assert SF.default_scale("dot", 16, conv=True) == pytest.approx(0.25)  # conv shapes: c = 1


# --------------------------------------------------------------------------- L_pred


@pytest.mark.parametrize("kind,scale", [("dot", 1.0), ("dot", 0.2), ("l2", 0.1)])
def test_pred_loss_matches_loop(kind, scale):
    n, m, d = 7, 4, 6
    h, t = rand(n, d, seed=9), rand(m, d, seed=10)
    y = torch.tensor([0, 1, 2, 3, 3, 1, 0])
    logits = loop_dot(h, t, scale) if kind == "dot" else loop_l2(h, t, scale)
    total = 0.0
    for i in range(n):
        row = [float(v) for v in logits[i]]
        log_z = math.log(sum(math.exp(v) for v in row))
        total += -(row[int(y[i])] - log_z)  # -log softmax of the true class
    got = SF.pred_loss(h, t, y, kind, scale)
    assert float(got) == pytest.approx(total / n, rel=1e-10)


def test_pred_loss_prefers_matching_target():
    """Outputs equal to their class target give a lower loss than shuffled targets."""
    t = rand(4, 16, seed=11)
    y = torch.tensor([0, 1, 2, 3])
    aligned = SF.pred_loss(t[y], t, y)
    wrong = SF.pred_loss(t[(y + 1) % 4], t, y)
    assert aligned < wrong


# --------------------------------------------------------------------------- class targets


def test_class_targets_matches_loop():
    n, d, m = 9, 5, 4
    t = rand(n, d, seed=12)
    y = torch.tensor([0, 2, 2, 0, 2, 1, 0, 2, 1])  # class 3 absent
    means, present = SF.class_targets(t, y, m)
    assert means.shape == (m, d) and present.shape == (m,) and present.dtype == torch.bool
    for c in range(m):
        rows = [t[i] for i in range(n) if int(y[i]) == c]
        assert bool(present[c]) == bool(rows)
        ref = sum(rows) / len(rows) if rows else torch.zeros(d, dtype=DT)
        torch.testing.assert_close(means[c], ref)


def test_class_targets_keeps_trailing_shape_and_grad():
    t = rand(6, 2, 3, 3, seed=13).requires_grad_(True)
    y = torch.tensor([1, 1, 0, 2, 0, 1])
    means, present = SF.class_targets(t, y, 3)
    assert means.shape == (3, 2, 3, 3) and present.tolist() == [True, True, True]
    torch.testing.assert_close(means[1], (t[0] + t[1] + t[5]) / 3)
    means.sum().backward()  # differentiable: each sample gets 1/count of its class mean
    counts = torch.bincount(y, minlength=3).to(DT)
    torch.testing.assert_close(t.grad, (1.0 / counts[y]).view(6, 1, 1, 1).expand_as(t))


def test_class_counts_counts_each_label_exactly():
    """Against a loop: absent classes 0, float32, exact past 16-bit range (300 of one class)."""
    y = torch.cat([torch.tensor([0, 2, 2, 4, 2]), torch.full((300,), 1)])
    counts = SF.class_counts(y, 6)
    assert counts.dtype == torch.float32 and counts.shape == (6,)
    assert counts.tolist() == [float(sum(int(v) == c for v in y)) for c in range(6)]
    assert counts.tolist() == [1.0, 300.0, 3.0, 0.0, 1.0, 0.0]


# --------------------------------------------------------------------------- generators


def test_label_projection_matches_loop():
    m, d = 3, 4
    S, b = rand(d, m, seed=14), rand(d, seed=15)
    c = torch.eye(m, dtype=DT)
    out = SF.label_projection(c, S, b)
    for j in range(m):
        for k in range(d):
            pre = sum(float(S[k, q]) * float(c[j, q]) for q in range(m)) + float(b[k])
            assert float(out[j, k]) == pytest.approx(leaky(pre), abs=1e-12)


def test_label_input_modulation_matches_loop():
    """Eq. 10: t1 = h1 * sigmoid(S1 c + d1) + leaky(S2 c + d2), one target per sample."""
    n, m, d = 5, 3, 8
    h1 = rand(n, d, seed=16)
    y = torch.tensor([0, 2, 1, 2, 0])
    c = F.one_hot(y, m).to(DT)
    S1, d1, S2, d2 = rand(d, m, seed=17), rand(d, seed=18), rand(d, m, seed=19), rand(d, seed=20)
    out = SF.label_input_modulation(h1, c, S1, d1, S2, d2)
    assert out.shape == h1.shape
    leaky = lambda v: v if v > 0 else 0.01 * v  # noqa: E731  (F.leaky_relu's default slope)
    for i in range(n):
        for k in range(d):
            a = sum(float(S1[k, q]) * float(c[i, q]) for q in range(m)) + float(d1[k])
            s = sum(float(S2[k, q]) * float(c[i, q]) for q in range(m)) + float(d2[k])
            ref = float(h1[i, k]) * sigmoid(a) + leaky(s)
            assert float(out[i, k]) == pytest.approx(ref, abs=1e-12)
    # broadcasting: every sample under every class, (n, 1, d) x (m, m) -> (n, m, d)
    every = SF.label_input_modulation(h1.unsqueeze(1), torch.eye(m, dtype=DT), S1, d1, S2, d2)
    assert every.shape == (n, m, d)
    torch.testing.assert_close(every[torch.arange(n), y], out)


def test_loop_back_prediction_and_error_match_loop():
    n, m, d_out, d = 4, 3, 5, 6
    p = rand(n, m, seed=21).softmax(1)
    y = torch.tensor([2, 0, 1, 1])
    c = F.one_hot(y, m).to(DT)
    S, b = rand(d, m, seed=22), rand(d, seed=23)
    out = SF.loop_back_prediction(p, c, S, b)
    h_out, g = rand(n, d_out, seed=24), rand(n, d_out, seed=25)
    S2, b2 = rand(d, d_out, seed=26), rand(d, seed=27)
    err = SF.loop_back_error(h_out, g, S2, b2, eta=0.5)
    for i in range(n):
        for k in range(d):
            pre = sum(float(S[k, q]) * (float(p[i, q]) + float(c[i, q])) for q in range(m))
            assert float(out[i, k]) == pytest.approx(leaky(pre + float(b[k])), abs=1e-12)
            pre2 = sum(float(S2[k, q]) * (float(h_out[i, q]) - 0.5 * float(g[i, q]))
                       for q in range(d_out))
            assert float(err[i, k]) == pytest.approx(leaky(pre2 + float(b2[k])), abs=1e-12)


def _double(gen):
    return gen.to(DT)


def test_label_signal_is_eq1_and_batch_independent():
    torch.manual_seed(0)
    gen = _double(build_signal("label", 4, (6,)))
    t = gen.targets(rand(3, 6))
    ref = F.leaky_relu(gen.proj.weight.T + gen.proj.bias, 0.01)  # row c: f(S e_c + d)
    torch.testing.assert_close(t, ref)
    torch.testing.assert_close(gen.targets(rand(9, 6, seed=3)), t)  # does not see the batch


def test_label_input_signal_matches_loop():
    """The generator class: sigmoid gain, LeakyReLU shift (its documented choice)."""
    torch.manual_seed(0)
    gen = _double(build_signal("label-input", 3, (2, 3)))
    h1 = rand(4, 2, 3, seed=30)
    y = torch.tensor([2, 0, 2, 1])
    t = gen.targets(h1, y)
    assert t.shape == h1.shape
    for i in range(4):
        c = F.one_hot(y[i], 3).to(DT)
        gain = torch.sigmoid(gen.scale.weight @ c + gen.scale.bias)
        shift = F.leaky_relu(gen.shift.weight @ c + gen.shift.bias, 0.01)
        torch.testing.assert_close(t[i].flatten(), h1[i].flatten() * gain + shift)


def _head_and_feedback(n=5, m=3, d_out=4):
    torch.manual_seed(1)
    head = torch.nn.Linear(d_out, m).to(DT)
    h_out = rand(n, d_out, seed=31)
    return head, Feedback(h_out, head(h_out).detach())


@pytest.mark.parametrize("name", ["label-input", "loop-pred", "loop-error"])
def test_candidates_are_targets_under_each_class(name):
    n, m, shape = 5, 3, (2, 2)
    head, fb = _head_and_feedback(n, m)
    torch.manual_seed(2)
    gen = _double(build_signal(name, m, shape, head=head, out_dim=4, eta=0.7))
    h1 = rand(n, *shape, seed=32)
    cand = gen.candidates(h1, fb)
    assert cand.shape == (n, m, *shape)
    for c in range(m):
        y = torch.full((n,), c)
        torch.testing.assert_close(cand[:, c], gen.targets(h1, y, fb))


def test_loop_error_uses_true_gradient_of_head_loss():
    """Eq. 12's dL/dh_L in closed form equals autograd's per-sample CE gradient."""
    n, m, d_out, shape = 6, 3, 4, (5,)
    head, fb = _head_and_feedback(n, m, d_out)
    torch.manual_seed(3)
    eta = 0.8
    gen = _double(build_signal("loop-error", m, shape, head=head, out_dim=d_out, eta=eta))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    h = fb.h_out.clone().requires_grad_(True)
    F.cross_entropy(head(h), y, reduction="sum").backward()  # per-sample gradients
    ref = F.leaky_relu(gen.proj(fb.h_out - eta * h.grad), 0.01)
    torch.testing.assert_close(gen.targets(rand(n, 5), y, fb), ref)


@pytest.mark.parametrize("name", ["loop-pred", "loop-error"])
def test_loop_back_signals_are_the_functional_equations(name):
    """The generators compute Eq. 11 / Eq. 12 exactly as sigprop.functional writes them."""
    n, m, d_out, shape = 5, 3, 4, (6,)
    head, fb = _head_and_feedback(n, m, d_out)
    torch.manual_seed(4)
    gen = _double(build_signal(name, m, shape, head=head, out_dim=d_out, eta=0.6))
    y = torch.tensor([0, 2, 1, 2, 0])
    c = F.one_hot(y, m).to(DT)
    p = fb.logits.softmax(1)
    if name == "loop-pred":
        ref = SF.loop_back_prediction(p, c, gen.proj.weight, gen.proj.bias)
    else:
        ref = SF.loop_back_error(fb.h_out, (p - c) @ head.weight, gen.proj.weight,
                                 gen.proj.bias, eta=0.6)
    torch.testing.assert_close(gen.targets(rand(n, *shape), y, fb), ref)


def test_loop_error_needs_linear_head():
    with pytest.raises(ConfigError, match="linear"):
        build_signal("loop-error", 3, (4,), head=None, out_dim=4)


@pytest.mark.parametrize("name", ["label", "label-input", "loop-pred"])
def test_fixed_signal_has_no_trainable_parameters(name):
    gen = build_signal(name, 3, (4,), learned=False)
    assert all(not p.requires_grad for p in gen.parameters())
    assert all(p.requires_grad for p in build_signal(name, 3, (4,)).parameters())
