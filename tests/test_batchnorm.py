"""InputStatsBatchNorm / stats_from_first / convert_batchnorm against manual BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sigprop.networks.batchnorm import InputStatsBatchNorm, convert_batchnorm, stats_from_first


def make_bn(kind: str, c: int, momentum=0.1, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    bn = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d}[kind](c, momentum=momentum)
    with torch.no_grad():  # non-trivial affine parameters and running stats
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return bn


def manual_bn(x: torch.Tensor, stats: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Normalise all of ``x`` with the mean and biased variance of ``stats``."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = stats.mean(dims, keepdim=True)
    var = ((stats - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


@pytest.mark.parametrize("kind,shape", [("1d", (10, 5)), ("2d", (9, 3, 4, 4))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_stats_from_first_rows(kind, shape, momentum):
    n = 4
    plain = make_bn(kind, shape[1], momentum)
    ref = copy.deepcopy(plain)
    bn = convert_batchnorm(copy.deepcopy(plain))
    assert isinstance(bn, InputStatsBatchNorm)
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # two steps: the cumulative average (momentum None) counts batches
        x = torch.randn(*shape, generator=g) * 2 + 1
        x[n:] += 5.0  # "targets" distributed very differently from the inputs
        with stats_from_first(n):
            out = bn(x)
        torch.testing.assert_close(out, manual_bn(x, x[:n], bn), atol=1e-5, rtol=1e-5)
        # running statistics as a plain BatchNorm sees them on the first n rows only
        ref_out = ref(x[:n])
        torch.testing.assert_close(out[:n], ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_mean, ref.running_mean)
        torch.testing.assert_close(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1


@pytest.mark.parametrize("kind,shape", [("1d", (10, 5)), ("2d", (6, 3, 2, 2))])
def test_outside_context_is_plain_batchnorm(kind, shape):
    plain = make_bn(kind, shape[1])
    bn = convert_batchnorm(copy.deepcopy(plain))
    x = torch.randn(*shape)
    torch.testing.assert_close(bn(x), plain(x))
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    torch.testing.assert_close(bn.running_var, plain.running_var)
    # n covering every row, or None, is also the plain behaviour
    for n in (None, shape[0], shape[0] + 3):
        with stats_from_first(n):
            torch.testing.assert_close(bn(x), plain(x))
    # eval mode: running statistics, whatever the context
    bn.eval()
    plain.eval()
    with stats_from_first(2):
        torch.testing.assert_close(bn(x), plain(x))


def test_context_is_scoped_and_nested():
    plain = make_bn("1d", 4)
    bn = convert_batchnorm(copy.deepcopy(plain))
    x = torch.randn(8, 4)
    with stats_from_first(3):
        with stats_from_first(5):
            torch.testing.assert_close(bn(x), manual_bn(x, x[:5], bn), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn(x), manual_bn(x, x[:3], bn), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError), stats_from_first(3):
        raise RuntimeError("boom")
    torch.testing.assert_close(bn(x), manual_bn(x, x, bn), atol=1e-5, rtol=1e-5)  # reset


def test_statistics_are_differentiable():
    """Gradients flow through the first-n-rows statistics (as in the manual formula)."""
    bn = convert_batchnorm(make_bn("1d", 3))
    x = torch.randn(7, 3, requires_grad=True)
    w = torch.randn(7, 3)
    with stats_from_first(4):
        (bn(x) * w).sum().backward()
    got_x, got_w = x.grad.clone(), bn.weight.grad.clone()
    x.grad = None
    bn.weight.grad = None
    (manual_bn(x, x[:4], bn) * w).sum().backward()
    torch.testing.assert_close(got_x, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, bn.weight.grad, atol=1e-5, rtol=1e-5)
    assert x.grad[:4].abs().sum() > 0


def test_convert_keeps_state_dict_and_shares_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, momentum=None)))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bn1, bn2 = net[1], net[3][1]
    tensors = [bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn1.num_batches_tracked]
    out = convert_batchnorm(net)
    assert out is net
    assert isinstance(net[1], InputStatsBatchNorm) and isinstance(net[3][1], InputStatsBatchNorm)
    assert net[3][1].momentum is None and net[1].momentum == bn1.momentum
    assert not net[1].training  # mode kept
    assert list(net.state_dict()) == list(before)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    new = net[1]
    for old_t, new_t in zip(tensors, [new.weight, new.bias, new.running_mean, new.running_var,
                                      new.num_batches_tracked]):
        assert old_t is new_t  # shared, not copied
    # training the converted module moves the original's tensors too
    net.train()
    with stats_from_first(3):
        net[1](torch.randn(5, 6))
    assert int(bn1.num_batches_tracked) == 1
    assert not torch.equal(bn1.running_mean, before["1.running_mean"])
    # converting twice is a no-op
    assert convert_batchnorm(net)[1] is new
    assert convert_batchnorm(bn2) is not bn2  # a bare BatchNorm is swapped and returned


@pytest.mark.parametrize("shape", [(12, 5), (7, 3, 4, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_input_stats_bn_backward_passes_gradcheck(shape, affine):
    """The hand-written backward (stats from rows [:n], applied to all rows) vs finite
    differences, in float64, for 2D and 4D inputs, with and without affine parameters."""
    from sigprop.networks.batchnorm import _InputStatsBN

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    c = shape[1]
    w = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True) if affine else None
    b = torch.randn(c, dtype=torch.float64, generator=g, requires_grad=True) if affine else None
    n = shape[0] - 3
    inputs = (x, w, b) if affine else (x,)

    def f(*args):
        xx, ww, bb = (*args, None, None) if not affine else args
        return _InputStatsBN.apply(xx, ww, bb, n, 1e-5, None)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("shape, steps", [((4 * 7, 5, 3, 3), 4), ((4 * 7, 5), 4), ((6, 5, 3, 3), 1)])
def test_input_stats_norm_over_step_major_groups(shape, steps):
    """A spiking net's [T * B, ...] batch: statistics from the first n samples of every
    step, against the same normalisation written with autograd ops (values, gradients,
    running mean), and gradcheck."""
    from sigprop.networks.batchnorm import _InputStatsBN, input_stats_norm

    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    n = 4
    rows = z.unflatten(0, (steps, shape[0] // steps))[:, :n]
    var, mean = torch.var_mean(rows, dim=[0, 1, *range(3, rows.dim())], correction=0)
    view = (1, -1) + (1,) * (z.dim() - 2)
    want = (z - mean.view(view)) * torch.rsqrt(var.view(view) + bn.eps) * bn.weight.view(view) \
        + bn.bias.view(view)
    got = input_stats_norm(bn, z, n, steps)
    assert torch.allclose(got, want)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    params = [z, bn.weight, bn.bias]
    for a, b in zip(torch.autograd.grad((got * w).sum(), params),
                    torch.autograd.grad((want * w).sum(), params)):
        assert torch.allclose(a, b)
    assert torch.allclose(bn.running_mean, 0.1 * mean.detach())
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, ww, bb: _InputStatsBN.apply(a, ww, bb, n, 1e-5, None, steps),
        (x, bn.weight, bn.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_stats_backward_keeps_layout_and_precision(dtype):
    """The written-out backward on channels-last maps: dx laid out as the maps, and
    within a rounding of the float64 autograd reference (16-bit: no worse than ATen's
    eval-mode backward at that precision, about 2^-8 relative)."""
    from sigprop.networks.batchnorm import input_stats_backward, input_stats_forward

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(11, 6, 4, 4, generator=g, dtype=torch.float64) * 3 + 2
    g64 = torch.randn(11, 6, 4, 4, generator=g, dtype=torch.float64)
    w64 = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    n = 8
    ref_x = x64.clone().requires_grad_(True)
    ref_w = w64.clone().requires_grad_(True)
    rows = ref_x[:n]
    var, mean = torch.var_mean(rows, dim=[0, 2, 3], correction=0)
    y = (ref_x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + 1e-5) \
        * ref_w.view(1, -1, 1, 1)
    want_dx, want_dw = torch.autograd.grad((y * g64).sum(), [ref_x, ref_w])
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    gg = g64.to(dtype).contiguous(memory_format=torch.channels_last)
    w = w64.float()
    _, mean, var = input_stats_forward(x, w, None, n, 1e-5, None)
    dx, dw, _ = input_stats_backward(gg, x, w, mean, var, n, 1e-5)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = want_dx.abs().max()
    assert (dx.double() - want_dx).abs().max() <= tol * scale
    torch.testing.assert_close(dw.double(), want_dw, atol=tol * want_dw.abs().max(), rtol=0)


def test_input_stats_backward_pair_matches_autograd():
    """Statistics from x, applied to x and to t (sparse targets' fields): dx, dt and the
    affine gradients against autograd in float64."""
    from sigprop.networks.batchnorm import input_stats_backward_pair

    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    var, mean = torch.var_mean(x, dim=[0, 2, 3], correction=0)
    view = (1, -1, 1, 1)

    def norm(z):
        return (z - mean.view(view)) * torch.rsqrt(var.view(view) + 1e-5) * w.view(view) \
            + b.view(view)

    gx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gt = torch.randn(t.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad((norm(x) * gx).sum() + (norm(t) * gt).sum(), [x, t, w, b])
    got = input_stats_backward_pair(gx, x.detach(), gt, t.detach(), w.detach(),
                                    mean.detach(), var.detach(), 1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
