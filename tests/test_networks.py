"""Networks: the fc builder, shape inference, and the fast Dropout's contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sigprop.errors import ConfigError
from sigprop.networks import Dropout, Network, build_network


def test_fc_builder_structure():
    net = build_network("fc-3x16", (1, 28, 28), 10, dropout=0.1)
    assert len(net.blocks) == 3
    assert net.block_shapes == [(16,), (16,), (16,)]
    assert net.blocks[0][1].in_features == 784
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 10
    assert type(net.blocks[0][0]) is nn.Flatten  # only the first block takes images
    kinds = [type(m) for m in net.blocks[1]]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, Dropout]
    assert net.blocks[1][2].negative_slope == 0.01
    # no Linear bias in front of BatchNorm (its gradient is exactly zero)
    assert all(b[0 if i else 1].bias is None for i, b in enumerate(net.blocks))
    assert net.head.bias is not None
    assert net.output_shape == (10,)
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    no_drop = build_network("fc-2x8", (8,), 4)
    assert not any(isinstance(m, Dropout) for m in no_drop.modules())


def test_shape_inference_leaves_running_stats_alone():
    net = build_network("fc-2x8", (8,), 4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert int(m.num_batches_tracked) == 0
            assert torch.equal(m.running_mean, torch.zeros(8))
    assert net.training


@pytest.mark.parametrize("name,match", [
    ("fc-3by10", "architecture"), ("fc-0x10", "architecture"), ("fc-2x0", "architecture"),
    ("fc", "architecture"), ("mlp-3x10", "unknown network"), ("conv-3x10", "the CONV net of Table VI is .conv."),
    ("fc-\u0663x32", "architecture"), ("fc-3x\u0663\u0662", "architecture"),  # not ASCII
    ("fc-1001x8", "layers"), ("fc-3x1000000000", "parameters"),
])
def test_bad_network_names(name, match):
    with pytest.raises(ConfigError, match=match):
        build_network(name, (1, 28, 28), 10)


def test_bad_dropout_and_empty_network():
    with pytest.raises(ConfigError, match="dropout"):
        build_network("fc-2x8", (8,), 4, dropout=1.0)
    with pytest.raises(ConfigError):
        Network([], nn.Linear(2, 2), (2,))


def test_mismatched_blocks_raise_config_error():
    blocks = [nn.Linear(8, 4), nn.Linear(5, 3)]
    with pytest.raises(ConfigError, match="block 2"):
        Network(blocks, nn.Linear(3, 2), (8,))


def test_mismatched_head_raises_config_error_naming_both_sizes():
    with pytest.raises(ConfigError, match=r"head Linear takes 5 input features, but block 1 "
                                          r"\(the last\) outputs 4"):
        Network([nn.Linear(8, 4)], nn.Linear(5, 2), (8,))


def test_leading_zeros_and_the_depth_cap():
    assert len(build_network("fc-02x08", (8,), 4).blocks) == 2
    assert len(build_network("fc-1000x2", (2,), 2).blocks) == 1000


def test_size_is_checked_before_allocating(monkeypatch):
    """The parameter count comes from the string: a network that cannot be trained in
    this memory is refused without building a single block."""
    import sigprop.networks as nets

    monkeypatch.setattr(nets, "fc_block", lambda *a, **k: pytest.fail("allocated a block"))
    with pytest.raises(ConfigError, match=r"fc-3x1000000000: 2\.00e\+18 parameters "
                                          r"\(weights, gradients and Adam's two moments\) "
                                          r"need about .*; choose a smaller --network"):
        build_network("fc-3x1000000000", (1, 28, 28), 10)


@pytest.mark.parametrize("arch,shape,classes", [("fc-3x16", (1, 28, 28), 10), ("fc-1x5", (7,), 3)])
def test_parameter_count_from_the_string_is_exact(arch, shape, classes):
    from sigprop.networks import fc_parameter_count, parse_fc_arch

    depth, width = parse_fc_arch(arch.removeprefix("fc-"))
    net = build_network(arch, shape, classes)
    count = fc_parameter_count(depth, width, int(torch.tensor(shape).prod()), classes)
    assert count == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_contract(p):
    torch.manual_seed(0)
    d = Dropout(p)
    x = torch.ones(400, 1000)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.01
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-3, atol=1e-3)
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the mean
    # backward: the same mask and scale
    xg = torch.randn(50, 30, requires_grad=True)
    out = d(xg)
    g = torch.randn_like(out)
    out.backward(g)
    mask = (out != 0).float() / (1 - d._cut / 65536)
    torch.testing.assert_close(out, xg.detach() * mask)
    torch.testing.assert_close(xg.grad, g * mask)
    # every lane of the 64-bit draws is used: no fixed position is always dropped
    y2 = d(torch.ones(4000, 8))
    assert ((y2 == 0).float().mean(0) - p).abs().max() < 0.05
    # different draws each call, identity in eval mode, odd sizes work
    assert not torch.equal(d(x), y)
    d.eval()
    assert torch.equal(d(x), x)
    d.train()
    assert d(torch.ones(3, 7)).shape == (3, 7)
    assert torch.equal(Dropout(0.0)(x), x)
    with pytest.raises(ConfigError):
        Dropout(1.0)
    with pytest.raises(ConfigError, match="rounds to 1"):  # threshold 65536: nothing kept
        Dropout(0.9999999)


def test_dropout_is_seeded_by_global_rng():
    d = Dropout(0.3)
    torch.manual_seed(5)
    a = d(torch.ones(10, 10))
    torch.manual_seed(5)
    assert torch.equal(d(torch.ones(10, 10)), a)


def test_dropout_spares_the_rows_after_n():
    """Under dropout_spares_rows_from(n) rows [n:] pass unchanged (values and gradient),
    rows [:n] get the very mask they would get without it (drawn for every row)."""
    from sigprop.networks import dropout_spared_from, dropout_spares_rows_from

    d = Dropout(0.4)
    x = torch.randn(12, 9, requires_grad=True)
    torch.manual_seed(3)
    full = d(x)
    torch.manual_seed(3)
    assert dropout_spared_from() is None
    with dropout_spares_rows_from(8):
        assert dropout_spared_from() == 8
        y = d(x)
    assert dropout_spared_from() is None
    assert torch.equal(y[:8], full[:8])
    assert torch.equal(y[8:], x[8:])
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad[8:], g[8:])
    mask = (full[:8] != 0).float() * d.scale
    torch.testing.assert_close(x.grad[:8], g[:8] * mask)
    with dropout_spares_rows_from(12):  # nothing after n: an ordinary dropout
        torch.manual_seed(3)
        assert torch.equal(d(x), full)
    d.eval()
    with dropout_spares_rows_from(2):
        assert torch.equal(d(x), x)
