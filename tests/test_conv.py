"""Convolutional networks (CONV, VGG8b, VGG8b-kx) and sparse targets (Sec. III-E):
shapes against slow references, blocks that learn alone, every rule on every network,
and runs on data in the true CIFAR and SVHN formats."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import lowers_loss, make_cifar, make_svhn_mat
from torch import nn

import sigprop.engine.trainer  # noqa: F401  (bind Trainer before tests capture stdout)
import sigprop.functional as SF
from sigprop.cli import main
from sigprop.errors import ConfigError
from sigprop.networks import Network, build_network
from sigprop.networks.conv import Pool, conv_block
from sigprop.networks.fc import fc_block
from sigprop.rules import build_rule
from sigprop.rules.sigprop import sparse
from sigprop.rules.sigprop import travel as SP

CLASSES = 10


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("name,shape,blocks,params", [
    ("vgg8b", (3, 32, 32), [(128, 32, 32), (256, 16, 16), (256, 16, 16), (512, 8, 8),
                            (512, 4, 4), (512, 2, 2), (1024,)], 8_900_234),
    ("vgg8b", (1, 28, 28), [(128, 28, 28), (256, 14, 14), (256, 14, 14), (512, 7, 7),
                            (512, 3, 3), (512, 1, 1), (1024,)], 7_325_066),
    ("conv", (3, 32, 32), [(96, 15, 15), (128, 7, 7), (256, 3, 3), (2048,), (2048,)], None),
    ("conv", (1, 28, 28), [(96, 13, 13), (128, 6, 6), (256, 2, 2), (2048,), (2048,)], None),
])
def test_network_shapes(name, shape, blocks, params):
    net = build_network(name, shape, CLASSES, dropout=0.1)
    assert net.block_shapes == blocks
    if params is not None:  # anokland/local-loss's README: 8.9M on CIFAR-10, 7.3M on MNIST
        assert sum(p.numel() for p in net.parameters()) == params
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert conv.bias is None  # BatchNorm follows: a bias would only collect Adam noise


def test_vgg8b_2x_doubles_conv_widths_only():
    a = build_network("vgg8b", (1, 28, 28), CLASSES)
    b = build_network("vgg8b-2x", (1, 28, 28), CLASSES)
    assert [s[0] * 2 for s in a.block_shapes[:-1]] == [s[0] for s in b.block_shapes[:-1]]
    assert a.block_shapes[-1] == b.block_shapes[-1] == (1024,)
    # anokland/local-loss's README: vgg8b (2x) on Fashion-MNIST has 28.2M parameters
    assert round(sum(p.numel() for p in b.parameters()) / 1e6, 1) == 28.2


@pytest.mark.parametrize("name,shape,match", [
    ("vgg8b", (3, 8, 8), "does not fit 8x8 images"),
    ("conv", (1, 12, 12), "does not fit 12x12 images"),
    ("vgg8b", (784,), "takes images"),
    ("vgg8b-0x", (1, 28, 28), "bad network 'vgg8b-0x'"),
    ("vgg8b-x", (1, 28, 28), "bad network"),
    ("conv-2", (1, 28, 28), "the CONV net of Table VI is 'conv'"),
])
def test_networks_that_do_not_fit_are_one_clear_error(name, shape, match):
    with pytest.raises(ConfigError, match=match):
        build_network(name, shape, CLASSES)


# --------------------------------------------------------------------------- targets


def small_conv_net(seed=0, dropout=0.0):
    """(1, 6, 6) -> conv 3x3 + 2x2 pool (4, 3, 3) -> conv 3x3 (5, 3, 3) -> fc 8."""
    torch.manual_seed(seed)
    blocks = [conv_block(1, 4, 3, 1, dropout, Pool(2, 2)), conv_block(4, 5, 3, 1, dropout),
              fc_block(45, 8, dropout, flatten=True)]
    return Network(blocks, nn.Linear(8, CLASSES), (1, 6, 6))


def ref_bn_eval(bn, t):
    shape = (1, -1) + (1,) * (t.dim() - 2)
    out = (t - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return out * bn.weight.view(shape) + bn.bias.view(shape)


def ref_pointwise(mod, t):
    """BatchNorm (eval), LeakyReLU and a Linear on targets written out; pooling and
    dropout (eval) leave them."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return ref_bn_eval(mod, t)
    if isinstance(mod, nn.LeakyReLU):
        return torch.where(t > 0, t, t * mod.negative_slope)
    if isinstance(mod, nn.Linear):
        return t @ mod.weight.T + (mod.bias if mod.bias is not None else 0)
    return t


def ref_sparse_targets(net, window):
    """A slow, separate reference of the sparse targets' travel (eval mode): the window
    conv as an explicit sum over (c, a, b); a field through a conv as the mean of the
    conv (with its padding) of the constant map; pooling leaves a field; a Flatten lays
    the field out over the map. Returns the targets after every block."""
    out, t, field = [], window, False
    shape = net.input_shape
    for i, block in enumerate(net.blocks):
        for mod in block:
            if isinstance(mod, nn.Conv2d):
                w = mod.weight
                if not field:  # the window: sum_{c,a,b} W[o, c, a, b] window[m, c, a, b]
                    t = torch.einsum("ocab,mcab->mo", w, t)[:, :, None, None]
                else:  # the mean of the conv (padding and all) of the constant map
                    spread = t.expand(-1, -1, *net.block_shapes[i - 1][1:])
                    t = F.conv2d(spread, w, None, mod.stride, mod.padding).mean(
                        (2, 3), keepdim=True)  # (m, C', 1, 1)
                field = True
            elif isinstance(mod, nn.Flatten):
                hw = net.block_shapes[i - 1][1:] if i else shape[1:]
                t = t.repeat(1, 1, *hw).flatten(1)
                field = False
            else:
                t = ref_pointwise(mod, t)
        out.append(t)
    return out


def ref_dense_targets(net, t1):
    """Dense targets: block 1's output targets, then every later block on them."""
    out = [t1]
    for block in net.blocks[1:]:
        out.append(block(out[-1]))
    return out


def walked_targets(rule, x):
    rule.set_training(False)
    with torch.no_grad():
        return [(h, t, mode) for _, h, t, mode in rule.exits.walk(x)]


@pytest.mark.parametrize("name,shape", [("small", (1, 6, 6)), ("vgg8b", (1, 16, 16)),
                                        ("conv", (3, 20, 20))])
def test_target_shapes_and_values_through_every_block(name, shape, float64):
    """Dense targets are shaped like each block's output; sparse ones are one window at
    block 1's input, (C, 1, 1) fields after each conv block and rows after a Flatten;
    both equal slow references block by block."""
    torch.manual_seed(0)
    net = small_conv_net() if name == "small" else build_network(name, shape, CLASSES, 0.1)
    x = torch.randn(3, *shape)
    dense = build_rule("sigprop", net, CLASSES)
    assert dense.target_shapes() == [tuple(s) for s in net.block_shapes]
    walked = walked_targets(dense, x)
    with torch.no_grad():
        ref = ref_dense_targets(dense.network, dense.signal.targets(x.new_zeros(1)))
    for (h, t, _), r in zip(walked, ref):
        torch.testing.assert_close(t, r)
    sparse = build_rule("sigprop", build_network(name, shape, CLASSES, 0.1) if name != "small"
                        else small_conv_net(), CLASSES, targets="sparse")
    c_in, k = shape[0], 3 if name != "conv" else 5
    assert sparse.signal.target_shape == (c_in, k, k)  # one kernel window per class
    shapes = sparse.target_shapes()
    for s, block_shape in zip(shapes, sparse.network.block_shapes):
        assert s == ((block_shape[0], 1, 1) if len(block_shape) == 3 else block_shape)
    walked = walked_targets(sparse, x)
    with torch.no_grad():
        ref = ref_sparse_targets(sparse.network, sparse.signal.targets(x))
    for i, ((h, t, mode), r) in enumerate(zip(walked, ref)):
        torch.testing.assert_close(t, r, msg=f"block {i + 1}")
        assert mode == (SP.FIELD if len(net.block_shapes[i]) == 3 else SP.ROWS)


def ref_layout(t, hw):
    """A field (m, C, G, G) laid out over a map by loops: position p takes cell
    floor(p G / H)."""
    m, c, gh, gw = t.shape
    out = t.new_empty(m, c, *hw)
    for p in range(hw[0]):
        for q in range(hw[1]):
            out[:, :, p, q] = t[:, :, p * gh // hw[0], q * gw // hw[1]]
    return out


def ref_grid_targets(net, window, grid):
    """A slow reference of sparse targets on a grid of windows (eval mode), by loops:
    each k x k window of the (C_in, G k, G k) target taken once by block 1's conv; a
    field through a later conv as each cell's mean of the conv (with its padding) of the
    laid-out map; a grid larger than a block's output map first averaged over the
    cells each output cell covers (adaptive average pooling's ranges); pooling leaves a
    field; a Flatten lays it out cell by cell."""
    out, t, field = [], window, False
    for i, block in enumerate(net.blocks):
        shape = net.block_shapes[i]
        if field and len(shape) == 3 and (t.shape[2] > shape[1] or t.shape[3] > shape[2]):
            gh, gw = min(t.shape[2], shape[1]), min(t.shape[3], shape[2])
            fit = t.new_empty(*t.shape[:2], gh, gw)
            for a in range(gh):
                for b in range(gw):
                    r0, r1 = a * t.shape[2] // gh, -(-(a + 1) * t.shape[2] // gh)
                    c0, c1 = b * t.shape[3] // gw, -(-(b + 1) * t.shape[3] // gw)
                    fit[:, :, a, b] = t[:, :, r0:r1, c0:c1].mean((2, 3))
            t = fit
        for mod in block:
            if isinstance(mod, nn.Conv2d):
                w = mod.weight
                k = w.shape[2]
                if not field:
                    g = t.shape[2] // k
                    cells = t.new_empty(t.shape[0], w.shape[0], g, g)
                    for a in range(g):
                        for b in range(g):
                            win = t[:, :, a * k:(a + 1) * k, b * k:(b + 1) * k]
                            cells[:, :, a, b] = torch.einsum("ocab,mcab->mo", w, win)
                    t = cells
                else:  # each cell's mean of the conv of the laid-out map
                    full = F.conv2d(ref_layout(t, net.block_shapes[i - 1][1:]), w, None,
                                    mod.stride, mod.padding)
                    hh, ww = full.shape[2:]
                    gh, gw = min(t.shape[2], hh), min(t.shape[3], ww)
                    cells = t.new_zeros(t.shape[0], w.shape[0], gh, gw)
                    count = torch.zeros(gh, gw)
                    for p in range(hh):
                        for q in range(ww):
                            cells[:, :, p * gh // hh, q * gw // ww] += full[:, :, p, q]
                            count[p * gh // hh, q * gw // ww] += 1
                    t = cells / count
                field = True
            elif isinstance(mod, nn.Flatten):
                t = ref_layout(t, net.block_shapes[i - 1][1:]).flatten(1)
                field = False
            else:
                t = ref_pointwise(mod, t)
        out.append(t)
    return out


@pytest.mark.parametrize("name,shape,grid", [("small", (1, 6, 6), 2), ("small", (1, 6, 6), 3),
                                             ("vgg8b", (1, 16, 16), 3), ("conv", (3, 28, 28), 3),
                                             ("vgg8b", (3, 16, 16), 1)])
def test_sparse_grid_targets_through_every_block(name, shape, grid, float64):
    """--sparse-grid G: a G x G grid of kernel windows at block 1's input, (C, G', G')
    fields after each conv block (G' = G, or the output map's size where it is
    smaller), rows after a Flatten; equal to a reference written with loops, block by
    block, and the exits compare each map with its laid-out field."""
    torch.manual_seed(0)
    net = small_conv_net() if name == "small" else build_network(name, shape, CLASSES, 0.1)
    rule = build_rule("sigprop", net, CLASSES, targets="sparse", sparse_grid=grid)
    c_in, k = shape[0], 3 if name != "conv" else 5
    assert rule.signal.target_shape == (c_in, grid * k, grid * k)
    for s, block_shape in zip(rule.target_shapes(), net.block_shapes):
        assert s == ((block_shape[0], min(grid, block_shape[1]), min(grid, block_shape[2]))
                     if len(block_shape) == 3 else block_shape)
    x = torch.randn(3, *shape)
    walked = walked_targets(rule, x)
    with torch.no_grad():
        ref = ref_grid_targets(net, rule.signal.targets(x), grid)
        scores = rule.exit_scores(x)
    for i, ((h, t, mode), r) in enumerate(zip(walked, ref)):
        torch.testing.assert_close(t, r, msg=f"block {i + 1}")
        if mode == SP.FIELD:
            want = SF.compare(h, ref_layout(r, h.shape[2:]), "dot", rule.scales[i])
            torch.testing.assert_close(scores[i], want)


@pytest.mark.parametrize("hw,grid,k,pad,stride", [((7, 7), 3, 3, 1, 1), ((3, 3), 3, 3, 1, 1),
                                                  ((3, 3), 1, 3, 1, 1), ((13, 13), 3, 5, 2, 1),
                                                  ((6, 5), 2, 3, 0, 2), ((28, 28), 1, 3, 1, 1)])
def test_a_field_through_a_conv_is_the_cell_mean_of_the_conv_of_its_map(hw, grid, k, pad,
                                                                          stride, float64):
    """Exact, borders and zero padding included: on a 3x3 map the corner taps count 4/9."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, k, stride=stride, padding=pad)
    t = torch.randn(2, 4, grid, grid)
    out = sparse.conv_field(conv, t, hw)
    full = F.conv2d(SF.lay_out(t, hw), conv.weight, conv.bias, stride, pad)
    g = tuple(out.shape[2:])
    want = SF.cell_sums(full, g) / SF.cell_counts(tuple(full.shape[2:]), g, full)
    torch.testing.assert_close(out, want)


def test_cell_sums_and_layout_are_transposes(float64):
    h, t = torch.randn(4, 3, 7, 5), torch.randn(6, 3, 3, 2)
    s = SF.cell_sums(h, (3, 2))
    ref = torch.zeros(4, 3, 3, 2)
    for p in range(7):
        for q in range(5):
            ref[:, :, p * 3 // 7, q * 2 // 5] += h[:, :, p, q]
    torch.testing.assert_close(s, ref)
    torch.testing.assert_close(SF.lay_out(t, (7, 5)), ref_layout(t, (7, 5)))
    counts = SF.cell_counts((7, 5), (3, 2), h)
    assert counts.sum() == 35 and counts.tolist() == [[9, 6], [6, 4], [6, 4]]
    for kind in ("dot", "l2"):
        torch.testing.assert_close(SF.field_compare(h, t, kind, 0.3),
                                   SF.compare(h, ref_layout(t, (7, 5)), kind, 0.3))


def test_sparse_grid_errors():
    with pytest.raises(ConfigError, match="add targets='sparse'"):
        build_rule("sigprop", small_conv_net(), CLASSES, sparse_grid=2)
    with pytest.raises(ConfigError, match="positive integer"):
        build_rule("sigprop", small_conv_net(), CLASSES, targets="sparse", sparse_grid=0)
    with pytest.raises(ConfigError, match="exceeds the first block's 3x3 output map"):
        build_rule("sigprop", small_conv_net(), CLASSES, targets="sparse", sparse_grid=4)
    with pytest.raises(ConfigError, match="is for conv first blocks"):
        build_rule("sigprop", build_network("fc-2x16", (1, 6, 6), CLASSES), CLASSES,
                   targets="sparse", sparse_grid=2)


def test_field_comparison_is_the_comparison_with_the_broadcast_target(float64):
    h, t = torch.randn(5, 3, 4, 4), torch.randn(7, 3, 1, 1)
    for kind in ("dot", "l2"):
        torch.testing.assert_close(SF.field_compare(h, t, kind, 0.3),
                                   SF.compare(h, t.expand(-1, -1, 4, 4), kind, 0.3))


def test_sparse_fc_target_is_k_values_zero_filled():
    net = build_network("fc-2x16", (1, 6, 6), CLASSES)
    rule = build_rule("sigprop", net, CLASSES, targets="sparse", sparse_size=7)
    t = rule.signal.targets(torch.zeros(1))
    assert t.shape == (CLASSES, 1, 6, 6)
    flat = t.flatten(1)
    assert torch.count_nonzero(flat[:, 7:]) == 0 and rule.signal.proj.out_features == 7
    assert rule.fast_path_off is None  # fc sparse targets take the written-out step


@pytest.mark.parametrize("kw,match", [
    ({"targets": "sparse", "signal": "label-input"}, "sparse targets .* exist for the signals label"),
    ({"targets": "sparse", "bn_stats": "all"}, "drop bn_stats='all'"),
    ({"sparse_size": 4}, "add targets='sparse'"),
    ({"targets": "sparse", "sparse_size": 0}, "positive integer"),
    ({"targets": "spars"}, "targets must be"),
])
def test_sparse_option_errors(kw, match):
    net = build_network("fc-2x16", (1, 6, 6), CLASSES)
    with pytest.raises(ConfigError, match=match):
        build_rule("sigprop", net, CLASSES, **kw)


def test_sparse_size_errors_by_first_block():
    with pytest.raises(ConfigError, match="exceeds the first block's 36 inputs"):
        build_rule("sigprop", build_network("fc-2x16", (1, 6, 6), CLASSES), CLASSES,
                   targets="sparse", sparse_size=37)
    with pytest.raises(ConfigError, match="is for fully connected first blocks"):
        build_rule("sigprop", small_conv_net(), CLASSES, targets="sparse", sparse_size=4)


@pytest.mark.parametrize("targets", ["dense", "sparse"])
def test_no_gradient_crosses_a_conv_block_boundary(targets, monkeypatch):
    """Every block receives inputs (and, from block 2 on, targets) outside any graph."""
    rule = build_rule("sigprop", small_conv_net(dropout=0.1), CLASSES, targets=targets,
                      head="classifier", fast_path="off")
    seen = []
    real = SP.forward_pair

    def spy(block, h, t, mode, *rest):
        seen.append((h.requires_grad, t.requires_grad, mode))
        return real(block, h, t, mode, *rest)

    monkeypatch.setattr(SP, "forward_pair", spy)
    mods = list(rule.network.blocks) + [rule.network.head]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.append(
        (args[0].requires_grad, None, i))) for i, m in enumerate(mods)]
    x, y = torch.randn(12, 1, 6, 6), torch.randint(0, CLASSES, (12,))
    rule.set_training(True)
    rule.train_step(x, y)
    for h in hooks:
        h.remove()
    assert seen and not any(h_rg for h_rg, _, _ in seen), seen
    # targets: only block 1's (from the generator, which learns from block 1's loss)
    t_graded = [mode for _, t_rg, mode in seen if t_rg]
    assert t_graded == ([SP.WINDOW] if targets == "sparse" else []), seen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv", "vgg8b", "vgg8b-2x"])
@pytest.mark.parametrize("rule_name,kw", [("sigprop", {}), ("sigprop", {"targets": "sparse"}),
                                          ("backprop", {}), ("shallow", {})])
def test_every_network_and_rule_lowers_its_loss_on_a_fixed_batch(name, rule_name, kw):
    _lowers_loss(name, rule_name, kw)


@pytest.mark.parametrize("rule_name,kw", [("sigprop", {}), ("sigprop", {"targets": "sparse"}),
                                          ("backprop", {}), ("shallow", {})])
def test_conv_and_each_rule_lower_the_loss_on_a_fixed_batch(rule_name, kw):
    _lowers_loss("conv", rule_name, kw)


def _lowers_loss(name, rule_name, kw):
    torch.manual_seed(0)
    net = build_network(name, (1, 16, 16), CLASSES, dropout=0.0)
    lowers_loss(build_rule(rule_name, net, CLASSES, **kw), (1, 16, 16))  # the default rate


# --------------------------------------------------------------------------- data formats


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
@pytest.mark.parametrize("network", ["conv", "vgg8b",
                                     pytest.param("vgg8b-2x", marks=pytest.mark.slow)])
def test_every_network_trains_on_cifar_and_svhn_format_data(dataset, network, tmp_path,
                                                              isolated_data):
    """One training step (and the test pass) from files in the datasets' true formats."""
    folder = tmp_path / "data" / dataset
    if dataset == "cifar10":
        make_cifar(folder, n=2)  # 5 training batches of 2 images, a test batch of 2
    else:
        make_svhn_mat(folder / "train_32x32.mat", 4)
        make_svhn_mat(folder / "test_32x32.mat", 2)
    run = tmp_path / "run"
    rc = main(["train", "--dataset", dataset, "--network", network, "--data-dir",
               str(folder), "--epochs", "1", "--batch-size", "4", "--train-limit", "4",
               "--run-dir", str(run), "--no-progress", "--dropout", "0.1"])
    assert rc == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss"]) and set(record["test_acc_exits"]) == {
        f"layer{i + 1}" for i in range(len(build_network(network, (3, 32, 32), 10).blocks))}


def test_sparse_grid_from_the_cli(tmp_path, isolated_data, capsys):
    """--targets sparse --sparse-grid G trains and is recorded; a bad G is one line, exit 2,
    and no run folder."""
    folder = tmp_path / "data" / "cifar10"
    make_cifar(folder, n=2)
    base = ["train", "--dataset", "cifar10", "--network", "conv", "--data-dir", str(folder),
            "--epochs", "1", "--batch-size", "4", "--train-limit", "4", "--no-progress",
            "--targets", "sparse"]
    run = tmp_path / "run"
    assert main([*base, "--sparse-grid", "2", "--run-dir", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())["config"]["rule"]
    assert config["targets"] == "sparse" and config["sparse_grid"] == 2
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main([*base, "--sparse-grid", "20", "--run-dir", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sparse-grid <= 15" in err[0], err
    assert not bad.exists()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_conv_learns_on_a_fashion_mnist_slice(tmp_path):
    """The CONV net with sigprop on 3,000 real Fashion-MNIST images beats 65%."""
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except Exception:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    run = tmp_path / "run"
    assert main(["train", "--network", "conv", "--train-limit", "3000", "--epochs", "2",
                 "--run-dir", str(run), "--no-progress"]) == 0
    acc = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    assert acc > 0.65, acc
