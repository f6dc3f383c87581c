"""The written-out sigprop step (sigprop.rules.sigprop.fastpath) against the autograd path.

Both paths must produce the same updates: parameters, BatchNorm running statistics,
optimizer state, losses and correct counts after several steps, in float64 (a Linear
bias before BatchNorm has an analytically zero gradient that float32 rounding noise,
amplified by Adam, would make path-dependent).
"""

from __future__ import annotations

import copy
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from helpers import random_batches, run_steps, sigprop_rule
from torch import nn

import sigprop.functional as SF
from sigprop.rules.sigprop import fastpath
from sigprop.networks.batchnorm import convert_batchnorm, stats_from_first
from sigprop.errors import ConfigError
from sigprop.networks import Dropout, Network, build_network, fc_block
from sigprop.rules import build_rule
from sigprop.rules.base import RuleConfig
from sigprop.rules.sigprop import Sigprop
from sigprop.signals import LabelProjection

CLASSES = 5


def make(arch="fc-3x24", input_shape=(1, 6, 6), dropout=0.0, seed=0, **kw):
    return sigprop_rule(arch, input_shape, CLASSES, dropout, seed, **kw)


def data(k=4, n=30, input_shape=(1, 6, 6), seed=3):
    return random_batches(k, n, input_shape, CLASSES, seed)


run = run_steps


def assert_same_state(a, b, atol=1e-9):
    a.sync()  # pipelined updates may still be in flight; modules.state_dict() does not wait
    b.sync()
    sa, sb = a.modules.state_dict(), b.modules.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-7, msg=k)
    for oa, ob in zip(a.optimizers, b.optimizers):
        for pa, pb in zip(oa.state.values(), ob.state.values()):
            for k in pa:
                torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=1e-7, msg=k)


CASES = [
    {},
    {"dropout": 0.2},
    {"loss": "l2"},
    {"loss": "l2", "dropout": 0.2},
    {"bn_stats": "all"},
    {"head": "classifier", "dropout": 0.1},
    {"signal_learned": False},
    {"logit_scale": 0.3, "weight_decay": 1e-3},
    {"arch": "fc-1x16"},
    {"arch": "fc-2x16", "input_shape": (12,)},
    {"signal": "label-input"},
    {"signal": "label-input", "dropout": 0.2, "loss": "l2"},
    {"signal": "label-input", "bn_stats": "all", "head": "classifier"},
    {"signal": "label-input", "signal_learned": False, "exit_targets": "candidates"},
    {"signal": "label-input", "n": 4},  # classes absent from a batch: no logit for them
    {"n": 4},
    {"signal": "loop-pred", "head": "classifier", "dropout": 0.1, "n": 8},
    {"signal": "loop-error", "head": "classifier", "loss": "l2", "eta": 0.5},
    {"signal": "loop-error", "head": "classifier", "signal_learned": False, "bn_stats": "all"},
    {"targets": "sparse"},  # Sec. III-E: K values for block 1's input, zero-filled
    {"targets": "sparse", "sparse_size": 5, "dropout": 0.2, "loss": "l2"},
    {"targets": "sparse", "head": "classifier", "signal_learned": False},
    # dropout on the target rows too (the default spares them: kept, unscaled)
    {"dropout": 0.2, "target_dropout": "on"},
    {"head": "classifier", "dropout": 0.1, "target_dropout": "on", "loss": "l2"},
    {"signal": "label-input", "dropout": 0.2, "target_dropout": "on"},
    {"targets": "sparse", "sparse_size": 5, "dropout": 0.2, "target_dropout": "on"},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_fast_path_matches_autograd(case, float64):
    case = dict(case)
    input_shape = case.pop("input_shape", (1, 6, 6))
    n = case.pop("n", 30)
    fast = make(input_shape=input_shape, fast_path="on", **case)
    slow = make(input_shape=input_shape, fast_path="off", **case)
    assert fast.fast_path_off is None and "written-out" in fast.step_kind
    assert slow.fast_path_off is not None and "autograd" in slow.step_kind
    batches = data(n=n, input_shape=input_shape)
    out_fast, out_slow = run(fast, batches), run(slow, batches)
    for (lf, cf), (ls, cs) in zip(out_fast, out_slow):
        torch.testing.assert_close(lf, ls, atol=1e-10, rtol=1e-9)
        assert torch.equal(cf, cs)
    assert_same_state(fast, slow)
    # and the trained rules agree at inference
    x = batches[0][0]
    fast.set_training(False)
    slow.set_training(False)
    for a, b in zip(fast.exit_scores(x), slow.exit_scores(x)):
        torch.testing.assert_close(a, b)


def test_fast_path_float32_stays_close():
    """In float32 the paths differ by rounding; parameters whose gradient is near zero
    (the Linear bias before BatchNorm: exactly zero) may take different Adam steps,
    so the comparison is of what the steps compute: losses and early exits."""
    fast, slow = make(fast_path="on", dropout=0.1), make(fast_path="off", dropout=0.1)
    batches = data(k=3)
    for (lf, cf), (ls, cs) in zip(run(fast, batches), run(slow, batches)):
        torch.testing.assert_close(lf, ls, atol=1e-4, rtol=1e-4)
    fast.set_training(False)
    slow.set_training(False)
    for a, b in zip(fast.exit_scores(batches[0][0]), slow.exit_scores(batches[0][0])):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", ["dot", "l2"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_block_step_gradients_against_autograd(kind, dropout, float64):
    torch.manual_seed(0)
    block = convert_batchnorm(fc_block(7, 9, dropout))
    parts = fastpath.match_block(block)
    assert isinstance(parts, fastpath.BlockParts)
    n, m = 11, CLASSES
    x = torch.randn(n + m, 7)
    y = torch.randint(0, CLASSES, (n,))
    ref = copy.deepcopy(block)
    torch.manual_seed(1)
    with torch.no_grad():
        o, loss, logits, dt = fastpath.block_step(parts, x, n, n, y, kind, 0.7)
    assert dt is None and o.shape == (n + m, 9) and logits.shape == (n, m)
    ref.train()
    torch.manual_seed(1)
    with stats_from_first(n):
        out = ref(x)
    ref_loss = F.cross_entropy(SF.compare(out[:n], out[n:], kind, 0.7), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(o, out.detach())
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(parts.bn, name), getattr(ref[1], name), msg=name)


def test_block_step_with_given_targets_returns_their_gradient(float64):
    torch.manual_seed(0)
    block = convert_batchnorm(fc_block(7, 9, 0.0))
    parts = fastpath.match_block(block)
    n = 13
    x, y = torch.randn(n, 7), torch.randint(0, CLASSES, (n,))
    t = torch.randn(CLASSES, 9, requires_grad=True)
    ref = copy.deepcopy(block)
    with torch.no_grad():
        _, _, _, dt = fastpath.block_step(parts, x, n, n, y, "dot", 0.5, targets=t.detach())
    ref.train()
    F.cross_entropy(SF.compare(ref(x), t, "dot", 0.5), y).backward()
    torch.testing.assert_close(dt, t.grad)
    for p, q in zip(block.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_fast_path_builds_no_graph():
    rule = make(fast_path="on", dropout=0.1)
    x, y = data(k=1)[0]
    rule.set_training(True)
    with torch.enable_grad():
        losses, correct = rule.train_step(x, y)
    assert not losses.requires_grad and losses.shape == (3,) and correct.shape == (3,)


def test_saved_tensors_are_counted_and_released():
    rule = make(fast_path="on", dropout=0.1)
    x, y = data(k=1)[0]
    live, peak, packed = [0], [0], []

    class Handle:
        def __init__(self, t):
            self.nbytes = t.numel() * t.element_size()
            live[0] += self.nbytes
            peak[0] = max(peak[0], live[0])
            packed.append(self.nbytes)

        def __del__(self):
            live[0] -= self.nbytes

    rule.set_training(True)
    with fastpath.track_saved(Handle):
        rule.train_step(x, y)
    assert len(packed) == 4 * 3  # x, a, the LeakyReLU/dropout factor, o per block
    assert live[0] == 0
    # one block's worth at a time: the largest block's four tensors
    assert peak[0] == max(sum(packed[i:i + 4]) for i in range(0, 12, 4))


class _OwnGenerator(LabelProjection):
    """A user's generator: the rule cannot know its formula."""

    def targets(self, h1, y, fb=None):
        return super().targets(h1, y, fb) * 0.5


def test_auto_falls_back_with_a_reason():
    torch.manual_seed(0)
    net = build_network("fc-2x16", (1, 6, 6), CLASSES)
    rule = Sigprop(net, CLASSES, RuleConfig(), signal=_OwnGenerator(CLASSES, (16,)))
    assert rule.fast_path_off is not None and "_OwnGenerator" in rule.step_kind
    run(rule, data(k=1))
    with pytest.raises(ConfigError, match="fast_path='on' but"):
        Sigprop(net, CLASSES, RuleConfig(fast_path="on"), signal=_OwnGenerator(CLASSES, (16,)))
    with pytest.raises(ConfigError, match="fast_path must be"):
        make(fast_path="yes")


def test_user_blocks_take_the_autograd_path():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh()),
              nn.Sequential(nn.Linear(16, 16), nn.Tanh())]
    net = Network(blocks, nn.Linear(16, CLASSES), (1, 6, 6))
    rule = build_rule("sigprop", net, CLASSES)
    assert "block 1" in rule.fast_path_off and "Tanh" in rule.fast_path_off
    run(rule, data(k=1))
    with pytest.raises(ConfigError, match="block 1"):
        build_rule("sigprop", Network(copy.deepcopy(blocks), nn.Linear(16, CLASSES), (1, 6, 6)),
                   CLASSES, fast_path="on")


def test_linear_on_unflattened_samples_takes_the_autograd_path():
    torch.manual_seed(0)
    # (8, 6) samples -> Linear -> (8, 8); BatchNorm1d(8) then normalises over dim 1
    blocks = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.01))]
    net = Network(blocks, nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES)), (8, 6))
    rule = build_rule("sigprop", net, CLASSES)
    assert "without Flatten" in rule.fast_path_off
    (losses, _), = run(rule, data(k=1, input_shape=(8, 6)))
    assert torch.isfinite(losses).all()


def test_hooks_switch_to_autograd_or_fail_when_required():
    rule = make()
    seen = []
    handle = rule.network.blocks[1].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    run(rule, data(k=1))
    assert seen, "a module hook must run: the step takes the autograd path"
    strict = make(fast_path="on")
    strict.network.blocks[0][1].register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(ConfigError, match="hooks"):
        run(strict, data(k=1))
    handle.remove()


def test_eval_mode_batchnorm_takes_the_autograd_path(float64):
    """train_step with BatchNorm in eval mode (running statistics) is the modules' own
    computation: the fast path steps aside, and both rules agree."""
    fast, slow = make(fast_path="auto"), make(fast_path="off")
    x, y = data(k=1)[0]
    for rule in (fast, slow):
        rule.set_training(True)
        rule.network.blocks[1][0].eval()  # blocks[1] = [Linear, BatchNorm, LeakyReLU]
        rule.network.blocks[1][1].eval()
    torch.testing.assert_close(fast.train_step(x, y)[0], slow.train_step(x, y)[0])
    assert_same_state(fast, slow)
    strict = make(fast_path="on")
    strict.set_training(True)
    strict.network.blocks[0][2].eval()
    with pytest.raises(ConfigError, match="eval mode"):
        strict.train_step(x, y)



def _user_net(seed=0):
    torch.manual_seed(seed)
    blocks = [
        nn.Sequential(nn.Flatten(), nn.Linear(36, 16, bias=False),
                      nn.BatchNorm1d(16, affine=False, momentum=None), nn.LeakyReLU(0.2)),
        nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.05), Dropout(0.1)),
    ]
    return Network(blocks, nn.Linear(16, CLASSES), (1, 6, 6))


@pytest.mark.parametrize("signal", ["label", "label-input"])
def test_user_blocks_of_the_standard_form_match_autograd(signal, float64):
    """No Linear bias, BatchNorm without affine parameters and with a cumulative
    running average, other LeakyReLU slopes: the fast path applies and agrees."""
    fast = build_rule("sigprop", _user_net(), CLASSES, signal=signal, fast_path="on")
    slow = build_rule("sigprop", _user_net(), CLASSES, signal=signal, fast_path="off")
    batches = data(k=3, n=12)
    for (lf, cf), (ls, cs) in zip(run(fast, batches), run(slow, batches)):
        torch.testing.assert_close(lf, ls, atol=1e-10, rtol=1e-9)
        assert torch.equal(cf, cs)
    assert_same_state(fast, slow)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("signal", ["label", "label-input"])
def test_default_fc_networks_take_the_written_out_step(dropout, signal):
    """fc blocks have no Linear bias (BatchNorm cancels it); the fast path matches
    them, and step_kind says so."""
    net = build_network("fc-3x16", (1, 6, 6), CLASSES, dropout=dropout)
    assert all(fastpath.match_block(b).op.bias is None
               for b in convert_batchnorm(net.blocks))
    rule = build_rule("sigprop", net, CLASSES, signal=signal)
    assert rule.fast_path_off is None
    assert rule.step_kind.startswith("written-out local updates")
    (losses, _), = run(rule, data(k=1))
    assert torch.isfinite(losses).all()


# --- conv blocks (Conv2d, BatchNorm2d, LeakyReLU, Dropout, MaxPool2d) -----------------

def conv_net(dropout=0.0, seed=0, pool_first=True, bias=False, channels=1, size=6):
    """A small conv net of the library's conv blocks: conv 3x3 -> 2x2 pool, conv 3x3,
    then an fc block and the head: (channels, 6, 6) -> (4, 3, 3) -> (5, 3, 3) -> (8,)
    (maps ``size`` wide: 6 by default)."""
    from sigprop.networks.conv import Pool, conv_block

    torch.manual_seed(seed)
    first = conv_block(channels, 4, 3, 1, dropout, Pool(2, 2) if pool_first else None)
    if bias:
        first[0] = nn.Conv2d(channels, 4, 3, padding=1, bias=True)
    side = size // 2 if pool_first else size
    blocks = [first, conv_block(4, 5, 3, 1, dropout, None),
              fc_block(5 * side * side, 8, dropout, flatten=True)]
    return Network(blocks, nn.Linear(8, CLASSES), (channels, size, size))


CONV_CASES = [
    {},
    {"dropout": 0.2},
    {"loss": "l2", "dropout": 0.2},
    {"bn_stats": "all"},
    {"head": "classifier", "dropout": 0.1},
    {"signal": "label-input", "dropout": 0.2},
    {"signal": "label-input", "n": 4},
    {"signal": "loop-pred", "head": "classifier", "dropout": 0.1, "n": 8},
    {"signal": "loop-error", "head": "classifier", "loss": "l2"},
    {"pool_first": False},
    {"bias": True},
    {"targets": "sparse"},  # windows at block 1, then constant fields (sigprop.rules.sigprop.sparse)
    {"targets": "sparse", "dropout": 0.2, "loss": "l2"},
    {"targets": "sparse", "head": "classifier", "pool_first": False},
    {"targets": "sparse", "signal_learned": False, "bias": True},
    {"dropout": 0.2, "target_dropout": "on"},  # pooled and unpooled blocks drop targets
    {"head": "classifier", "dropout": 0.1, "target_dropout": "on", "pool_first": False},
    {"signal": "label-input", "dropout": 0.2, "target_dropout": "on"},
    {"targets": "sparse", "dropout": 0.2, "target_dropout": "on"},
    {"targets": "sparse", "sparse_grid": 2},  # a 2x2 grid of windows, 2x2 fields on 3x3 maps
    {"targets": "sparse", "sparse_grid": 3, "dropout": 0.2, "loss": "l2"},
    {"targets": "sparse", "sparse_grid": 2, "head": "classifier", "pool_first": False},
]


@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_conv_fast_path_matches_autograd(case, float64):
    case = dict(case)
    n = case.pop("n", 30)
    net_kw = {k: case.pop(k) for k in ("dropout", "pool_first", "bias") if k in case}
    fast = build_rule("sigprop", conv_net(**net_kw), CLASSES, fast_path="on", pipeline="off",
                      **case)
    slow = build_rule("sigprop", conv_net(**net_kw), CLASSES, fast_path="off", **case)
    assert fast.fast_path_off is None and all(p.conv for p in fast.fast_parts[:2])
    batches = data(n=n)
    for (lf, cf), (ls, cs) in zip(run(fast, batches), run(slow, batches)):
        torch.testing.assert_close(lf, ls, atol=1e-10, rtol=1e-9)
        assert torch.equal(cf, cs)
    assert_same_state(fast, slow)
    fast.set_training(False)
    slow.set_training(False)
    for a, b in zip(fast.exit_scores(batches[0][0]), slow.exit_scores(batches[0][0])):
        torch.testing.assert_close(a, b)


CHANNELS_LAST_CASES = [{}, {"dropout": 0.2}, {"loss": "l2"}, {"targets": "sparse"},
                       {"head": "classifier", "dropout": 0.1}, {"pool_first": False}]


@pytest.mark.parametrize("case", CHANNELS_LAST_CASES,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_conv_fast_path_on_channels_last_maps(case, float64):
    """A conv net whose weights and inputs are channels-last (NHWC in memory): the
    written-out step matches autograd on the same net, and, without dropout (whose masks
    are drawn in memory order), the step on NCHW maps."""
    case = dict(case)
    net_kw = {k: case.pop(k) for k in ("dropout", "pool_first") if k in case}
    cl = torch.channels_last

    def rule(fast, layout):
        net = conv_net(channels=2, **net_kw)
        if layout is cl:
            net = net.to(memory_format=cl)
        return build_rule("sigprop", net, CLASSES, fast_path=fast, pipeline="off", **case)

    batches = data(input_shape=(2, 6, 6))
    cl_batches = [(x.contiguous(memory_format=cl), y) for x, y in batches]
    fast, slow = rule("on", cl), rule("off", cl)
    assert fast.fast_path_off is None
    # every conv's weight gradient is taken on channels-last maps (not merely on maps
    # that are both layouts at once)
    from sigprop.rules.sigprop import sparse

    calls = []

    def spy(op, x, da):
        calls.append((op, x, da))
        return real(op, x, da)

    real = fastpath.op_backward
    with patch.object(fastpath, "op_backward", spy), patch.object(sparse, "op_backward", spy):
        fast.train_step(*cl_batches[0])
    maps = [t for op, *ts in calls if isinstance(op, nn.Conv2d) for t in ts]
    assert len(maps) == 4 and all(fastpath.channels_last(t) for t in maps)
    fast = rule("on", cl)
    for (lf, cf), (ls, cs) in zip(run(fast, cl_batches), run(slow, cl_batches)):
        torch.testing.assert_close(lf, ls, atol=1e-10, rtol=1e-9)
        assert torch.equal(cf, cs)
    assert_same_state(fast, slow)
    if "dropout" not in net_kw:
        nchw = rule("on", None)
        for (lf, _), (ln, _) in zip(run(rule("on", cl), cl_batches), run(nchw, batches)):
            torch.testing.assert_close(lf, ln, atol=1e-10, rtol=1e-9)
        assert_same_state(fast, nchw)


@pytest.mark.parametrize("case", [{}, {"dropout": 0.2, "loss": "l2"}, {"targets": "sparse"}],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_conv_fast_path_on_channels_last_maps_a_power_of_two_wide(case, float64):
    """Channels-last maps 8 wide: the pooling's codes come from ATen's indices on one
    byte (fastpath._halving_code); the step still matches autograd."""
    case = dict(case)
    net_kw = {k: case.pop(k) for k in ("dropout",) if k in case}
    cl = torch.channels_last

    def rule(fast):
        net = conv_net(channels=2, size=8, **net_kw).to(memory_format=cl)
        return build_rule("sigprop", net, CLASSES, fast_path=fast, pipeline="off", **case)

    batches = [(x.contiguous(memory_format=cl), y) for x, y in data(input_shape=(2, 8, 8))]
    fast, slow = rule("on"), rule("off")
    codes = []
    real = fastpath._halving_code
    with patch.object(fastpath, "_halving_code",
                      lambda idx, width: codes.append(width) or real(idx, width)):
        for (lf, cf), (ls, cs) in zip(run(fast, batches), run(slow, batches)):
            torch.testing.assert_close(lf, ls, atol=1e-10, rtol=1e-9)
            assert torch.equal(cf, cs)
    assert codes and set(codes) == {8}
    assert_same_state(fast, slow)


@pytest.mark.parametrize("targets,target_dropout,grid",
                         [("dense", "on", 1), ("sparse", "on", 1), ("dense", "off", 1),
                          ("sparse", "off", 1), ("sparse", "off", 2)])
def test_conv_pipeline_matches_sequential(targets, target_dropout, grid, float64):
    """The pipeline hands conv blocks' updates to the update thread: same updates."""
    kw = {"sparse_grid": grid} if grid != 1 else {}
    seq = build_rule("sigprop", conv_net(dropout=0.1), CLASSES, pipeline="off",
                     targets=targets, target_dropout=target_dropout, **kw)
    pipe = build_rule("sigprop", conv_net(dropout=0.1), CLASSES, pipeline="on",
                      targets=targets, target_dropout=target_dropout, **kw)
    assert pipe.pipelines
    batches = data(k=3)
    for (la, ca), (lb, cb) in zip(run(seq, batches), run(pipe, batches)):
        torch.testing.assert_close(la, lb, atol=1e-10, rtol=1e-9)
        assert torch.equal(ca, cb)
    assert_same_state(seq, pipe)


def test_conv_block_keeps_its_input_preactivation_mask_and_output():
    """A pooling conv block keeps x, a, the 1-byte mask, its pooled output and a 1-byte
    code of where each maximum was (not the pre-pooling map, nor int64 indices),
    released block by block."""
    rule = build_rule("sigprop", conv_net(dropout=0.1), CLASSES, fast_path="on",
                      pipeline="off")
    x, y = data(k=1)[0]
    live, peak, packed = [0], [0], []

    class Handle:
        def __init__(self, t):
            self.nbytes = t.numel() * t.element_size()
            self.shape = tuple(t.shape)
            live[0] += self.nbytes
            peak[0] = max(peak[0], live[0])
            packed.append(self.shape)

        def __del__(self):
            live[0] -= self.nbytes

    rule.set_training(True)
    with fastpath.track_saved(Handle):
        rule.train_step(x, y)
    n, m = x.shape[0], CLASSES
    # block 1 sees only inputs: x, a, pooled o, the mask, the pooling's codes
    assert packed[:5] == [(n, 1, 6, 6), (n, 4, 6, 6), (n, 4, 3, 3), (n, 4, 6, 6),
                          (n, 4, 3, 3)]
    assert packed[5:9] == [(n + m, 4, 3, 3), (n + m, 5, 3, 3), (n + m, 5, 3, 3),
                           (n + m, 5, 3, 3)]
    assert live[0] == 0


@pytest.mark.parametrize("kernel,stride,padding,shape", [
    (2, 2, 0, (3, 5, 32, 32)), (3, 2, 1, (2, 4, 15, 15)), (2, 2, 0, (2, 3, 7, 9)),
    (3, 3, 0, (2, 3, 9, 9)), ((2, 3), (1, 2), (1, 1), (2, 3, 6, 7))])
def test_pool_codes_rebuild_the_poolings_indices(kernel, stride, padding, shape):
    """The one-byte window codes and the indices rebuilt from them (by comparisons, not
    division) equal max_pool2d_with_indices' own, ties and padding included."""
    from sigprop.rules.sigprop import fastpath as fp

    pool = torch.nn.MaxPool2d(kernel, stride, padding)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x[x < -0.5] = 0.0  # ties inside windows
    p, code = fp._pool(pool, x, None)
    want_p, want_i = torch.ops.aten.max_pool2d_with_indices(x, *fp._pool_geometry(pool))
    assert code.dtype == torch.uint8 and torch.equal(p, want_p)
    assert torch.equal(fp._window_index(pool, code, shape[3]), want_i)
    # many ties at the maximum: small integers
    x = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(1)).float()
    p, code = fp._pool(pool, x, None)
    want_p, want_i = torch.ops.aten.max_pool2d_with_indices(x, *fp._pool_geometry(pool))
    assert torch.equal(p, want_p)
    assert torch.equal(fp._window_index(pool, code, shape[3]), want_i)


def test_halving_pool_and_its_gradient_equal_atens():
    """VGG8b's 2 x 2, stride 2 pooling by elementwise maxima: the pooled map (also into
    a given output) and the indices rebuilt from its codes equal ATen's, ties included."""
    from sigprop.rules.sigprop import fastpath as fp

    pool = torch.nn.MaxPool2d(2, 2)
    geometry = fp._pool_geometry(pool)
    g = torch.Generator().manual_seed(2)
    for x in (torch.randn(3, 4, 8, 6, generator=g),
              torch.randint(-1, 2, (3, 4, 8, 6), generator=g).float()):
        assert fp._halving(geometry, x)
        want_p, want_i = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
        out = torch.empty_like(want_p)
        p, code = fp._pool_2x2(x, out)
        assert p.data_ptr() == out.data_ptr() and torch.equal(p, want_p)
        assert torch.equal(fp._window_index(pool, code, x.shape[3]), want_i)
    assert not fp._halving(geometry, torch.zeros(1, 1, 7, 8))


@pytest.mark.parametrize("width", [2, 4, 8, 16, 32, 64, 128, 6, 10, 256])
def test_halving_pool_codes_on_channels_last_maps_of_any_even_width(width):
    """The one-byte codes of a channels-last halving pooling (from the index's low byte
    when the width is a power of two up to 128, else by the general path) rebuild ATen's
    indices, ties included."""
    from sigprop.rules.sigprop import fastpath as fp

    pool = torch.nn.MaxPool2d(2, 2)
    g = torch.Generator().manual_seed(width)
    for x in (torch.randn(2, 3, 6, width, generator=g),
              torch.randint(-1, 2, (2, 3, 6, width), generator=g).float()):
        want_p, want_i = torch.ops.aten.max_pool2d_with_indices(x, *fp._pool_geometry(pool))
        p, code = fp._pool(pool, x.contiguous(memory_format=torch.channels_last), None)
        assert torch.equal(p, want_p) and code.dtype == torch.uint8
        assert code.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(fp._window_index(pool, code.contiguous(), width), want_i)


def test_halving_pool_on_channels_last_maps_equals_atens():
    """On channels-last maps the halving pooling takes ATen's kernel (the general path);
    the pooled map (also into a given output, laid out so), the codes and the gradient
    written back from them equal ATen's NCHW pooling and its backward, ties included."""
    from sigprop.rules.sigprop import fastpath as fp

    pool = torch.nn.MaxPool2d(2, 2)
    geometry = fp._pool_geometry(pool)
    cl = torch.channels_last
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(3, 5, 8, 6, generator=g),
              torch.randint(-1, 2, (3, 5, 8, 6), generator=g).float()):
        want_p, want_i = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
        xc = x.contiguous(memory_format=cl)
        for out in (None, torch.empty_like(want_p, memory_format=cl)):
            p, code = fp._pool(pool, xc, out)
            assert torch.equal(p, want_p) and code.dtype == torch.uint8
            # the codes laid out as the maps, with or without an output buffer: the
            # unpooling reads them contiguously (NCHW codes made it ~3x slower)
            assert p.is_contiguous(memory_format=cl) and code.is_contiguous(memory_format=cl)
            assert out is None or p.data_ptr() == out.data_ptr()
            assert torch.equal(fp._window_index(pool, code.contiguous(), x.shape[3]), want_i)
        dq = torch.randn(want_p.shape, generator=g)
        want = torch.ops.aten.max_pool2d_with_indices_backward(dq, x, *geometry, want_i)
        du = fp._unpool_2x2(dq.contiguous(memory_format=cl), code, xc)
        assert du.is_contiguous(memory_format=cl) and torch.equal(du, want)


@pytest.mark.parametrize("k", [1000, 2048, 6 * 4096, 8192, 32768, 65536])
def test_classes_by_values_equals_the_matrix_product(k, float64):
    """dL/dt = gᵀ h over chunks of the values (long rows) equals the one product, into a
    given output (a view of a larger map) or a new tensor, for rows that are views."""
    g = torch.randn(12, 10)
    rows = torch.randn(14, k)[:12]  # h: the first rows of a larger map
    want = g.T @ rows
    torch.testing.assert_close(fastpath._classes_by_values(g, rows), want, rtol=1e-12, atol=1e-12)
    big = torch.empty(13, k)
    out = fastpath._classes_by_values(g, rows, big[3:])
    assert out.data_ptr() == big[3:].data_ptr()
    torch.testing.assert_close(big[3:], want, rtol=1e-12, atol=1e-12)
