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
    assert [type(m) for m in net.blocks[0]][0] is nn.Flatten  # only the first block takes images
    kinds = [type(m) for m in net.blocks[1]]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, Dropout]
    assert net.blocks[1][2].negative_slope == 0.01
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
    ("fc", "architecture"), ("conv-3x10", "unknown network"),
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


def test_dropout_is_seeded_by_global_rng():
    d = Dropout(0.3)
    torch.manual_seed(5)
    a = d(torch.ones(10, 10))
    torch.manual_seed(5)
    assert torch.equal(d(torch.ones(10, 10)), a)
