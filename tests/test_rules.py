"""Learning rules on tiny networks: sigprop's locality, optimizers, signals, heads,
inference, and backprop/shallow against manual autograd steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import blobs
from torch import nn

import sigprop.functional as SF
from sigprop.networks.batchnorm import stats_from_first
from sigprop.errors import CheckpointError, ConfigError
from sigprop.networks import build_network
from sigprop.rules import build_rule
from sigprop.signals import Feedback

CLASSES, DIM = 4, 8
SIGNALS = ["label", "label-input", "loop-pred", "loop-error"]


def make_rule(name="sigprop", arch="fc-2x16", seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    net = build_network(arch, (DIM,), CLASSES, dropout=dropout)
    return build_rule(name, net, CLASSES, **kw)


def batches(k=3, n=24, seed=1):
    x, y = blobs(n_per_blob=(k * n) // (2 * CLASSES) + 1, classes=CLASSES, dim=DIM, seed=seed)
    return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(k)]


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def changed(before, module):
    return [not torch.equal(b, p) for b, p in zip(before, module.parameters())]


# --------------------------------------------------------------------------- (a) locality


def ref_targets(gen, signal, h1, y):
    eye = torch.eye(CLASSES)
    if signal == "label":  # Eq. 1, one row per class
        return F.leaky_relu(eye @ gen.proj.weight.T + gen.proj.bias, 0.01)
    c = eye[y]  # Eq. 10 (sigmoid gain, LeakyReLU shift), one row per sample
    gain = torch.sigmoid(c @ gen.scale.weight.T + gen.scale.bias)
    return h1 * gain + F.leaky_relu(c @ gen.shift.weight.T + gen.shift.bias, 0.01)


def ref_logits(h, t, y, signal, kind, scale):
    present = torch.ones(CLASSES, dtype=torch.bool)
    if signal != "label":  # per-sample targets -> per-class means, absent classes masked
        rows = []
        for c in range(CLASSES):
            sel = t[y == c]
            present[c] = len(sel) > 0
            rows.append(sel.mean(0) if len(sel) else torch.zeros(t.shape[1]))
        t = torch.stack(rows)
    if kind == "dot":
        logits = h @ t.T * scale
    else:
        logits = -((h[:, None, :] - t[None, :, :]) ** 2).sum(-1) * scale
    return logits.masked_fill(~present, float("-inf"))


def reference_sigprop(net, gen, data, lr, signal, kind, logit_scale=None, joint=False, eps=1e-8):
    """Per-block training by hand: block i's loss alone, its inputs detached, one Adam per
    block (the generator with block 1). ``joint=True`` is the wrong algorithm (one
    backward of the summed loss through everything), used to show the test can tell."""
    blocks = net.blocks
    groups = [list(blocks[0].parameters()) + list(gen.parameters())]
    groups += [list(b.parameters()) for b in blocks[1:]]
    opts = [torch.optim.Adam(g, lr=lr, eps=eps) for g in groups]
    for x, y in data:
        n = len(x)
        losses, h, t = [], None, None
        for i, block in enumerate(blocks):
            if i == 0:
                h_out = block(x)
                t_out = ref_targets(gen, signal, h_out, y)
            else:
                with stats_from_first(n):
                    z = block(torch.cat([h, t]))
                h_out, t_out = z[:n], z[n:]
            d = h_out.shape[1]
            scale = logit_scale or SF.default_scale(kind, d, per_sample=signal != "label")
            losses.append(F.cross_entropy(ref_logits(h_out, t_out, y, signal, kind, scale), y))
            h, t = (h_out, t_out) if joint else (h_out.detach(), t_out.detach())
        if joint:
            for o in opts:
                o.zero_grad()
            sum(losses).backward()
            for o in opts:
                o.step()
        else:
            for o, loss in zip(opts, losses):
                o.zero_grad()
                loss.backward()
                o.step()


@pytest.mark.parametrize("signal,kind,logit_scale", [
    ("label", "dot", None), ("label-input", "dot", None), ("label", "l2", None),
    ("label", "dot", 0.5),
])
def test_each_block_learns_from_its_own_loss_only(signal, kind, logit_scale, float64):
    lr = 1e-2
    rule = make_rule(arch="fc-3x16", signal=signal, loss=kind, lr=lr, logit_scale=logit_scale)
    net0, gen0 = copy.deepcopy(rule.network), copy.deepcopy(rule.signal)
    wrong_net, wrong_gen = copy.deepcopy(net0), copy.deepcopy(gen0)
    eps = 1e-4
    for o in rule.optimizers:
        for g in o.param_groups:
            g["eps"] = eps
    data = batches(3)
    rule.set_training(True)
    for x, y in data:
        rule.train_step(x, y)
    reference_sigprop(net0, gen0, data, lr, signal, kind, logit_scale, eps=eps)
    for (name, a), b in zip(rule.network.blocks.state_dict().items(),
                            net0.blocks.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"blocks.{name}")
    for a, b in zip(rule.signal.parameters(), gen0.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # sensitivity: letting gradients cross block boundaries gives visibly other weights
    reference_sigprop(wrong_net, wrong_gen, data, lr, signal, kind, logit_scale, True, eps)
    diff = max((a - b).abs().max().item() for a, b in
               zip(rule.network.blocks[0].parameters(), wrong_net.blocks[0].parameters()))
    assert diff > 1e-3


@pytest.mark.parametrize("signal,head", [("label", "target"), ("label-input", "target"),
                                         ("loop-pred", "classifier"), ("loop-error", "classifier")])
def test_block_inputs_carry_no_gradient(signal, head):
    """Every block (and the head) receives inputs outside any autograd graph."""
    rule = make_rule(arch="fc-3x16", signal=signal, head=head)
    seen = []
    mods = list(rule.network.blocks) + [rule.network.head]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.append(
        (i, args[0].requires_grad, torch.is_grad_enabled()))) for i, m in enumerate(mods)]
    x, y = batches(1)[0]
    rule.set_training(True)
    rule.train_step(x, y)
    for h in hooks:
        h.remove()
    graded = [(i, rg) for i, rg, enabled in seen if enabled]
    assert sorted({i for i, _ in graded}) == list(range(len(mods) if head == "classifier" else 3))
    assert all(not rg for _, rg in graded), graded


# --------------------------------------------------------------------------- (b) optimizers


@pytest.mark.parametrize("head", ["target", "classifier"])
@pytest.mark.parametrize("fast_path", ["auto", "off"])
def test_one_parameter_group_per_block_generator_with_block1(head, fast_path):
    rule = make_rule(arch="fc-3x16", head=head, fast_path=fast_path)
    blocks = rule.network.blocks
    (opt,) = rule.optimizers
    names = [g["name"] for g in opt.param_groups]
    assert names == ["block1", "block2", "block3"] + (["head"] if head == "classifier" else [])
    owners = []
    for mod in [*blocks, rule.signal, rule.network.head]:
        ids = {id(p) for p in mod.parameters()}
        owners.append({g["name"] for g in opt.param_groups for p in g["params"] if id(p) in ids})
    assert owners[0] == owners[3] == {"block1"}  # block 1 and the generator share a group
    assert owners[1] == {"block2"} and owners[2] == {"block3"}
    assert owners[4] == ({"head"} if head == "classifier" else set())
    # behaviour: with every other group's lr at 0, one step moves block 1 and the
    # generator only
    for g in opt.param_groups[1:]:
        g["lr"] = 0.0
    mods = {"b1": blocks[0], "b2": blocks[1], "b3": blocks[2], "gen": rule.signal,
            "head": rule.network.head}
    before = {k: params_of(m) for k, m in mods.items()}
    x, y = batches(1)[0]
    rule.set_training(True)
    rule.train_step(x, y)
    for k, m in mods.items():
        moved = any(changed(before[k], m))
        assert moved == (k in ("b1", "gen")), k


@pytest.mark.parametrize("signal", ["label", "label-input"])
def test_fixed_signal_never_moves(signal):
    rule = make_rule(signal=signal, signal_learned=False, lr=1e-2)
    gen_before, blocks_before = params_of(rule.signal), params_of(rule.network.blocks)
    rule.set_training(True)
    for x, y in batches(3):
        rule.train_step(x, y)
    assert not any(changed(gen_before, rule.signal))
    assert all(changed(blocks_before, rule.network.blocks))
    # and a learned one does move
    learned = make_rule(signal=signal, lr=1e-2)
    before = params_of(learned.signal)
    learned.set_training(True)
    learned.train_step(*batches(1)[0])
    assert all(changed(before, learned.signal))


# --------------------------------------------------------------------------- (d) signals


@pytest.mark.parametrize("signal", SIGNALS)
def test_every_signal_trains(signal):
    rule = make_rule(arch="fc-2x16", signal=signal, head="classifier", lr=1e-2)
    before = params_of(rule.modules)
    rule.set_training(True)
    losses = []
    for x, y in batches(3):
        loss, correct = rule.train_step(x, y)
        assert loss.shape == (3,) and correct.shape == (3,)
        assert torch.isfinite(loss).all() and (loss > 0).all()
        assert ((correct >= 0) & (correct <= len(y))).all()
        losses.append(loss)
    trainable = [b for b, p in zip(before, rule.modules.parameters()) if p.requires_grad]
    moved = [c for c, p in zip(changed(before, rule.modules), rule.modules.parameters())
             if p.requires_grad]
    assert len(trainable) == len(moved) and all(moved)


@pytest.mark.parametrize("signal", ["loop-pred", "loop-error"])
def test_loop_signals_need_classifier_head(signal):
    with pytest.raises(ConfigError, match="classifier"):
        make_rule(signal=signal)


@pytest.mark.parametrize("kw,match", [
    ({"lr": 0.0}, "learning rate"), ({"lr": -1.0}, "learning rate"),
    ({"head": "mlp"}, "head"), ({"loss": "cos"}, "loss"), ({"bn_stats": "x"}, "bn_stats"),
    ({"signal": "nope"}, "signal"), ({"logit_scale": 0.0}, "logit scale"),
    ({"weight_decay": -1.0}, "weight decay"), ({"bogus": 1}, "bogus"),
    ({"exit_targets": "both"}, "exit_targets"),
])
def test_rule_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        make_rule(**kw)


def test_unknown_rule():
    with pytest.raises(ConfigError, match="unknown rule 'xfa'"):
        make_rule("xfa")


# --------------------------------------------------------------------------- (e)-(f) heads


@pytest.mark.parametrize("signal", SIGNALS)
def test_classifier_prediction_ignores_the_signal(signal):
    rule = make_rule(arch="fc-2x16", signal=signal, head="classifier", lr=1e-2)
    rule.set_training(True)
    for x, y in batches(2):
        rule.train_step(x, y)
    rule.set_training(False)
    x, _ = batches(1, seed=7)[0]
    pred = rule.predict(x)
    assert pred.shape == (len(x), CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(pred, rule.network(x))  # the head on the last block
        early = rule.exit_scores(x)[0].clone()
        for p in rule.signal.parameters():
            p.copy_(torch.randn_like(p) * 3)
    torch.testing.assert_close(rule.predict(x), pred)
    # The early exit of a per-class generator compares with its targets, so it changes;
    # per-sample generators' exits compare with stored prototypes, no generator involved.
    same = torch.allclose(rule.exit_scores(x)[0], early)
    assert same == rule.signal.per_sample


@pytest.mark.parametrize("arch,head,names", [
    ("fc-2x16", "target", ["layer1", "layer2"]),
    ("fc-3x16", "classifier", ["layer1", "layer2", "layer3", "head"]),
])
def test_exit_names_and_output_shapes(arch, head, names):
    rule = make_rule(arch=arch, head=head)
    assert rule.exit_names == names
    x, y = batches(1)[0]
    rule.set_training(True)
    losses, correct = rule.train_step(x, y)
    assert losses.shape == correct.shape == (len(names),)
    assert losses.dtype.is_floating_point and not correct.dtype.is_floating_point
    assert not losses.requires_grad
    rule.set_training(False)
    scores = rule.exit_scores(x)
    assert len(scores) == len(names) and all(s.shape == (len(x), CLASSES) for s in scores)
    ev = rule.eval_step(x, y)
    assert ev.tolist() == [int((s.argmax(1) == y).sum()) for s in scores]
    torch.testing.assert_close(rule.predict(x), scores[-1])
    for name in ("backprop", "shallow"):
        assert make_rule(name).exit_names == ["output"]


def test_target_head_correct_counts_match_the_losses_logits():
    """train_step's correct count for layer i is the argmax of O(h_i, t_i) on that batch."""
    rule = make_rule(arch="fc-2x16", lr=1e-12)  # (almost) no movement during the step
    x, y = batches(1)[0]
    rule.set_training(True)
    ref = copy.deepcopy(rule)
    _, correct = rule.train_step(x, y)
    with torch.no_grad():
        h = ref.network.blocks[0](x)
        t = ref.signal.targets(h)
        expect = [int((SF.dot_compare(h, t).argmax(1) == y).sum())]
        with stats_from_first(len(x)):
            z = ref.network.blocks[1](torch.cat([h, t]))
        expect.append(int((SF.dot_compare(z[:len(x)], z[len(x):]).argmax(1) == y).sum()))
    assert correct.tolist() == expect


# --------------------------------------------------------------------------- (g) baselines


def assert_same_learned_parameters(net, ref, atol=1e-9, rtol=1e-7) -> list[str]:
    """Parameters and buffers of ``net`` equal ``ref``'s (compare in float64), except
    parameters whose gradient in ``ref`` is zero: Adam turns the rounding noise of a
    zero gradient into lr-sized steps whose sign depends on the summation order (the
    thread count). Returns the names of those skipped."""
    grads = {k: p.grad for k, p in ref.named_parameters()}
    skipped = []
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        g = grads.get(k)
        if g is not None and g.abs().max() <= 1e-12 * max(1.0, b.abs().max().item()):
            skipped.append(k)
            continue
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=k)
    return skipped


def test_backprop_step_equals_manual_adam(float64):
    lr = 1e-2
    rule = make_rule("backprop", arch="fc-2x16", lr=lr, dropout=0.0)
    ref = copy.deepcopy(rule.network)
    opt = torch.optim.Adam(ref.parameters(), lr=lr)
    rule.set_training(True)
    for x, y in batches(3):
        loss, correct = rule.train_step(x, y)
        logits = ref(x)
        ref_loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        assert float(loss[0]) == pytest.approx(ref_loss.item(), rel=1e-10)
        assert int(correct[0]) == int((logits.argmax(1) == y).sum())
    # fc blocks have no Linear bias in front of BatchNorm: every parameter learns
    assert assert_same_learned_parameters(rule.network, ref) == []


def test_shallow_trains_only_the_head(float64):
    lr = 1e-2
    rule = make_rule("shallow", arch="fc-2x16", lr=lr)
    ref = copy.deepcopy(rule.network)
    opt = torch.optim.Adam(ref.head.parameters(), lr=lr)
    blocks_before = params_of(rule.network.blocks)
    head_before = params_of(rule.network.head)
    rule.set_training(True)
    for x, y in batches(2):
        rule.train_step(x, y)
        with torch.no_grad():
            feats = x
            for b in ref.blocks:
                feats = b(feats)
        opt.zero_grad()
        F.cross_entropy(ref.head(feats), y).backward()
        opt.step()
    assert not any(changed(blocks_before, rule.network.blocks))
    assert all(changed(head_before, rule.network.head))
    for a, b in zip(rule.network.head.parameters(), ref.head.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    # the frozen blocks still count the batches in their running statistics, as ref's
    for a, b in zip(rule.network.blocks.buffers(), ref.blocks.buffers()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------- (h) inference


def loop_exit_scores(rule, x, fb=None):
    """Per-class loop: each candidate label's target sent through every block separately."""
    blocks, n = rule.network.blocks, len(x)
    with torch.no_grad():
        hs = [x]
        for b in blocks:
            hs.append(b(hs[-1]))
        hs = hs[1:]
        scores = [torch.zeros(n, CLASSES) for _ in blocks]
        for c in range(CLASSES):
            t = rule.signal.targets(hs[0], torch.full((n,), c), fb)
            for i, b in enumerate(blocks):
                if i:
                    t = b(t)
                scale = SF.default_scale(rule.opts.loss, hs[i].shape[1], rule.signal.per_sample)
                if rule.opts.loss == "dot":
                    scores[i][:, c] = (hs[i] * t).sum(1) * scale
                else:
                    scores[i][:, c] = -((hs[i] - t) ** 2).sum(1) * scale
    return scores


@pytest.mark.parametrize("signal,head,loss", [
    ("label-input", "target", "dot"), ("label-input", "target", "l2"),
    ("loop-pred", "classifier", "dot"), ("loop-error", "classifier", "dot"),
])
def test_per_sample_inference_scores_every_candidate(signal, head, loss):
    rule = make_rule(arch="fc-3x16", signal=signal, head=head, loss=loss, lr=1e-2,
                     exit_targets="candidates")
    rule.set_training(True)
    for x, y in batches(3):
        rule.train_step(x, y)
    rule.set_training(False)
    x, y = batches(1, n=20, seed=9)[0]
    fb = None
    if rule.signal.needs_feedback:  # Fig. 2c: the network's own label-free output
        with torch.no_grad():
            h = x
            for b in rule.network.blocks:
                h = b(h)
            fb = Feedback(h.flatten(1), rule.network.head(h))
    ref = loop_exit_scores(rule, x, fb)
    got = rule.exit_scores(x)
    for i in range(3):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-4)
    expect = [int((s.argmax(1) == y).sum()) for s in ref]
    assert rule.eval_step(x, y).tolist()[:3] == expect


@pytest.mark.parametrize("signal,head,loss", [
    ("label-input", "target", "dot"), ("label-input", "target", "l2"),
    ("loop-pred", "classifier", "dot"), ("loop-error", "classifier", "dot"),
])
def test_prototypes_are_running_class_means_of_training_targets(signal, head, loss):
    """Reference: replay the steps, recompute each layer's class means of the targets
    with a loop, and keep the running means by hand."""
    # the spy sits in the autograd path; the fast path's prototypes equal these
    # (tests/test_fastpath.py compares the whole state, prototypes included)
    rule = make_rule(arch="fc-3x16", signal=signal, head=head, loss=loss, lr=1e-2,
                     fast_path="off")
    seen_targets = []  # per step, per layer: (targets, labels), captured as trained
    orig = rule._layer_logits

    def spy(i, h, t, y):
        if i == 0:
            seen_targets.append([])
        seen_targets[-1].append((t.detach().clone(), y.clone()))
        return orig(i, h, t, y)

    rule._layer_logits = spy
    rule.set_training(True)
    data = batches(3)
    data[0] = (data[0][0][:6], torch.tensor([0, 0, 1, 1, 2, 2]))  # class 3 absent at first
    for x, y in data:
        rule.train_step(x, y)
    m = rule.prototypes.momentum
    for i in range(3):
        ref = torch.zeros(CLASSES, 16)
        seen = [False] * CLASSES
        for step in seen_targets:
            t, y = step[i]
            for c in range(CLASSES):
                rows = [t[j] for j in range(len(y)) if int(y[j]) == c]
                if not rows:
                    continue
                mean_c = torch.stack(rows).mean(0)
                ref[c] = (1 - m) * ref[c] + m * mean_c if seen[c] else mean_c
                seen[c] = True
        proto, got_seen = rule.prototypes.get(i)
        torch.testing.assert_close(proto, ref, atol=1e-6, rtol=1e-5)
        assert got_seen.tolist() == seen
    # the exits compare with them, with the rule's scale; no label, no generator
    rule.set_training(False)
    x, _ = batches(1, n=10, seed=5)[0]
    scores = rule.exit_scores(x)
    with torch.no_grad():
        h = x
        for i, b in enumerate(rule.network.blocks):
            h = b(h)
            want = SF.compare(h, rule.prototypes.get(i)[0], loss, rule.scales[i])
            torch.testing.assert_close(scores[i], want)


def test_unseen_class_prototype_never_wins_and_state_dict_carries_prototypes():
    rule = make_rule(signal="label-input", lr=1e-2)
    rule.set_training(True)
    x, _ = batches(1)[0]
    rule.train_step(x, torch.arange(len(x)) % 3)  # class 3 never seen
    rule.set_training(False)
    scores = rule.exit_scores(x)
    assert all(torch.isinf(s[:, 3]).all() and (s[:, 3] < 0).all() for s in scores)
    assert (scores[-1].argmax(1) != 3).all()
    state = rule.state_dict()
    assert "prototypes.mean0" in state["modules"] and "prototypes.seen1" in state["modules"]
    other = make_rule(signal="label-input", seed=5)
    other.load_state_dict(state)
    for i in range(2):
        for a, b in zip(other.prototypes.get(i), rule.prototypes.get(i)):
            assert torch.equal(a, b)
    assert make_rule(signal="label").prototypes is None  # per-class targets need none
    assert make_rule(signal="label-input", exit_targets="candidates").prototypes is None


def test_label_inference_compares_with_class_targets():
    rule = make_rule(arch="fc-2x16", lr=1e-2)
    rule.set_training(True)
    for x, y in batches(2):
        rule.train_step(x, y)
    rule.set_training(False)
    x, _ = batches(1, seed=4)[0]
    with torch.no_grad():
        h1 = rule.network.blocks[0](x)
        h2 = rule.network.blocks[1](h1)
        t1 = rule.signal.targets(h1)
        t2 = rule.network.blocks[1](t1)
    got = rule.exit_scores(x)
    torch.testing.assert_close(got[0], SF.dot_compare(h1, t1, 1.0))
    torch.testing.assert_close(got[1], SF.dot_compare(h2, t2, 1.0))


# --------------------------------------------------------------------------- BN wiring


@pytest.mark.parametrize("bn_stats", ["inputs", "all"])
def test_bn_running_stats_come_from_inputs_only(bn_stats):
    rule = make_rule(arch="fc-2x16", bn_stats=bn_stats)
    block = rule.network.blocks[1]
    linear = next(m for m in block if isinstance(m, nn.Linear))
    bn = next(m for m in block if isinstance(m, nn.modules.batchnorm._BatchNorm))
    captured = {}
    hook = linear.register_forward_hook(lambda m, a, out: captured.setdefault("z", out.detach()))
    x, y = batches(1)[0]
    rule.set_training(True)
    rule.train_step(x, y)
    hook.remove()
    z = captured["z"]
    rows = z[: len(x)] if bn_stats == "inputs" else z
    torch.testing.assert_close(bn.running_mean, 0.1 * rows.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * rows.var(0), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- state


def test_state_dict_roundtrip_and_mismatch():
    rule = make_rule(arch="fc-2x16", head="classifier", signal="label-input", lr=1e-2)
    rule.set_training(True)
    for x, y in batches(2):
        rule.train_step(x, y)
    state = copy.deepcopy(rule.state_dict())
    other = make_rule(arch="fc-2x16", head="classifier", signal="label-input", lr=1e-2, seed=5)
    other.load_state_dict(state)
    x, y = batches(1, seed=3)[0]
    rule.set_training(True)
    other.set_training(True)
    a, b = rule.train_step(x, y), other.train_step(x, y)  # optimizer state restored too
    torch.testing.assert_close(a[0], b[0])
    for p, q in zip(rule.modules.parameters(), other.modules.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(CheckpointError, match="another network, rule or signal"):
        target_head = make_rule(arch="fc-2x16", signal="label-input", lr=1e-2)
        target_head.load_state_dict(state)


# --------------------------------------------------------------------------- (i) learning


@pytest.mark.parametrize("signal,head", [("label", "target"), ("label-input", "target"),
                                         ("label", "classifier")])
def test_sigprop_learns_separable_blobs(signal, head):
    """4 classes, 2 Gaussian blobs each (not linearly separable per class): >90% train acc."""
    torch.manual_seed(0)
    x, y = blobs(n_per_blob=64, classes=CLASSES, blobs_per_class=2, dim=DIM, seed=0)
    rule = make_rule(arch="fc-2x32", signal=signal, head=head, lr=3e-3)
    rule.set_training(False)
    acc0 = (rule.predict(x).argmax(1) == y).float().mean().item()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(y), (64,), generator=g)
        rule.set_training(True)
        rule.train_step(x[idx], y[idx])
    rule.set_training(False)
    acc = (rule.predict(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, (acc0, acc)
    assert acc > acc0 + 0.3


def test_generator_shape_must_match_first_block():
    from sigprop.rules.base import RuleConfig
    from sigprop.rules.sigprop import Sigprop
    from sigprop.signals import build_signal

    net = build_network("fc-2x16", (DIM,), CLASSES)
    with pytest.raises(ConfigError, match="target generator makes targets of shape"):
        Sigprop(net, CLASSES, RuleConfig(), signal=build_signal("label", CLASSES, (5,)))


@pytest.mark.parametrize("signal", ["label", "label-input"])
def test_conv_blocks_learn_with_image_shaped_targets(signal):
    """Any stack of blocks works: conv blocks get (C, H, W) targets, BatchNorm2d is
    converted, and the network learns a toy task where the class is a bright quadrant."""
    from torch import nn

    from sigprop.networks import Network

    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.01)),
        nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
                      nn.LeakyReLU(0.01)),
    ]
    net = Network(blocks, nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES)), (1, 8, 8))
    assert net.block_shapes == [(4, 8, 8), (4, 4, 4)]
    rule = build_rule("sigprop", net, CLASSES, signal=signal, head="classifier", lr=5e-3)
    assert type(rule.network.blocks[1][1]).__name__ == "InputStatsBatchNorm"
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, CLASSES, (256,), generator=g)
    x = torch.rand(256, 1, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, 0, r * 4:r * 4 + 4, col * 4:col * 4 + 4] += 1.0
    for step in range(60):
        idx = torch.randint(0, 256, (64,), generator=g)
        rule.set_training(True)
        losses, _ = rule.train_step(x[idx], y[idx])
        assert torch.isfinite(losses).all()
    rule.set_training(False)
    scores = rule.exit_scores(x)
    assert [s.shape for s in scores] == [(256, CLASSES)] * 3
    accs = [(s.argmax(1) == y).float().mean().item() for s in scores]
    assert min(accs) > 0.9, accs


@pytest.mark.parametrize("signal", ["loop-pred", "loop-error"])
def test_loop_feedback_pass_counts_batch_once_in_running_stats(signal):
    """The label-free feedback pass must not update BatchNorm running statistics."""
    rule = make_rule(arch="fc-2x16", signal=signal, head="classifier")
    rule.set_training(True)
    for x, y in batches(3):
        rule.train_step(x, y)
    for m in rule.network.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert int(m.num_batches_tracked) == 3


# --------------------------------------------------------------------------- the template


def test_a_rule_implements_the_protected_steps_and_gets_the_checks():
    """The public methods check the batch, then call _train_step / _exit_scores: a new
    rule writes only those and is refused bad batches like the built-in ones."""
    from sigprop.errors import InputError
    from sigprop.rules.base import LearningRule, RuleConfig

    calls = []

    class HeadOnly(LearningRule):
        def __init__(self, *args):
            super().__init__(*args)
            self.exit_names = ["output"]

        def _train_step(self, x, y):
            calls.append("train")
            return torch.zeros(1), torch.zeros(1, dtype=torch.int64)

        def _exit_scores(self, x):
            calls.append("scores")
            assert not torch.is_grad_enabled()
            return [self.network(x)]

    rule = HeadOnly(build_network("fc-2x16", (DIM,), CLASSES), CLASSES, RuleConfig())
    x, y = batches(1)[0]
    rule.set_training(True)
    rule.train_step(x, y)
    assert rule.eval_step(x, y).shape == (1,)
    assert rule.predict(x).shape == rule.exit_scores(x)[0].shape == (len(x), CLASSES)
    assert calls == ["train", "scores", "scores", "scores"]
    for bad in ((x, y + CLASSES), (x[:, :3], y), (x, y[:, None])):
        with pytest.raises(InputError):
            rule.train_step(*bad)
    assert calls == ["train", "scores", "scores", "scores"]
    with pytest.raises(NotImplementedError, match="_train_step"):
        LearningRule(rule.network, CLASSES, RuleConfig()).train_step(x, y)
