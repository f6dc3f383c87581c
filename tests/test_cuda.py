"""The same code on a CUDA GPU: every rule's steps match the CPU's, the loader and the
custom autograd Functions run on the device, and a whole CLI run trains, resumes and
evaluates there. Skipped on machines without CUDA (CI has none); see
scripts/gpu_check.sh for the GPU session that runs them."""

from __future__ import annotations

import io
import itertools
import json
import math
import os

import pytest
import torch
from helpers import blobs, small_config

from sigprop.networks.batchnorm import _InputStatsBN
from sigprop.cli import main
from sigprop.data import DeviceLoader, parse_augment
from sigprop.engine import runio
from sigprop.engine.trainer import Trainer
from sigprop.networks import Dropout, build_network
from sigprop.rules import build_rule

# SIGPROP_GPU_TESTS_ON=cpu runs this file's logic on the CPU (a check of the tests
# themselves on machines without a GPU); the default is the first CUDA device.
CUDA = torch.device(os.environ.get("SIGPROP_GPU_TESTS_ON", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU")

CLASSES, DIM = 4, 8


@pytest.fixture(autouse=True)
def no_tf32():
    """Plain float32 matmuls on the GPU, so CPU and GPU agree to float32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rule(name, device, **kw):
    torch.manual_seed(0)
    net = build_network("fc-3x32", (DIM,), CLASSES)
    return build_rule(name, net, CLASSES, **kw).to(device)


def _bias_before_bn(root):
    """Keys of Linear biases that a BatchNorm directly follows, and of that BN's running mean."""
    keys = set()
    for name, mod in root.named_modules():
        kids = list(mod.named_children())
        for (a, m1), (b, m2) in itertools.pairwise(kids):
            if isinstance(m1, torch.nn.Linear) and isinstance(m2, torch.nn.modules.batchnorm._BatchNorm):
                keys.add(f"{name}.{a}.bias".lstrip("."))
                keys.add(f"{name}.{b}.running_mean".lstrip("."))
    return keys


@pytest.mark.parametrize("name, kw", [
    ("sigprop", {}),  # label signal: the fast path (sigprop.rules.sigprop.fastpath)
    ("sigprop", {"fast_path": "off"}),  # the same through autograd
    ("sigprop", {"fast_path": "on", "head": "classifier"}),
    ("sigprop", {"loss": "l2"}),
    ("sigprop", {"head": "classifier"}),
    ("sigprop", {"signal": "label-input"}),
    ("sigprop", {"signal": "loop-pred", "head": "classifier"}),
    ("sigprop", {"signal": "loop-error", "head": "classifier"}),
    ("sigprop", {"bn_stats": "all"}),
    ("backprop", {}),
    ("shallow", {}),
])
def test_steps_on_cuda_match_cpu(name, kw):
    x, y = blobs(n_per_blob=16, classes=CLASSES, dim=DIM)
    cpu, gpu = _rule(name, "cpu", **kw), _rule(name, CUDA, **kw)
    for rule in (cpu, gpu):
        rule.set_training(True)
    for k in range(4):
        xb, yb = x[k * 32:(k + 1) * 32], y[k * 32:(k + 1) * 32]
        lc, cc = cpu.train_step(xb, yb)
        lg, cg = gpu.train_step(xb.to(CUDA), yb.to(CUDA))
        assert lg.device.type == CUDA.type and cg.device.type == CUDA.type
        torch.testing.assert_close(lg.cpu(), lc, rtol=1e-3, atol=1e-5)
        assert (cg.cpu() - cc).abs().max() <= 1  # correct counts; a near-tie may flip one
    sc, sg = cpu.modules.state_dict(), gpu.modules.state_dict()
    lr, steps = cpu.cfg.lr, 4
    for key in sc:
        if key in _bias_before_bn(cpu.modules):
            # A Linear bias right before BN has a true gradient of 0 (BN removes it), so
            # Adam steps on rounding noise there, and that BN's running mean follows it.
            continue
        c, g = sc[key].double(), sg[key].cpu().double()
        diff, tol = (g - c).abs(), 1e-4 + 1e-3 * c.abs()
        # Adam moves every element by about lr per step whatever its gradient's size, so
        # an element whose gradient is ~0 (a near-cancelling sum) moves by the sign of
        # rounding noise: allow a few such elements, each off by at most 2 lr per step.
        assert (diff <= tol).double().mean() >= 0.8, key
        assert diff.max() <= 2 * lr * steps + 1e-4, key
    for rule in (cpu, gpu):
        rule.set_training(False)
    xt, yt = x[128:], y[128:]
    torch.testing.assert_close(gpu.eval_step(xt.to(CUDA), yt.to(CUDA)).cpu(), cpu.eval_step(xt, yt),
                               rtol=0, atol=1)  # counts; a near-tie may flip one sample


@pytest.mark.parametrize("shape", [(12, 5), (7, 3, 4, 4)])
def test_input_stats_bn_gradcheck_on_cuda(shape):
    g = torch.Generator(device=CUDA).manual_seed(0)
    kw = {"dtype": torch.float64, "device": CUDA, "requires_grad": True}
    x = torch.randn(*shape, generator=g, **kw)
    w, b = torch.randn(shape[1], generator=g, **kw), torch.randn(shape[1], generator=g, **kw)
    n = shape[0] - 3
    assert torch.autograd.gradcheck(
        lambda *a: _InputStatsBN.apply(*a, n, 1e-5, None), (x, w, b))


def test_dropout_on_cuda_keeps_the_expected_fraction():
    drop = Dropout(0.25).train()
    x = torch.ones(512, 1000, device=CUDA)
    out = drop(x)
    kept = (out != 0).double().mean().item()
    assert abs(kept - 0.75) < 0.005
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))


def test_loader_on_cuda_is_seeded_and_matches_cpu_without_augment():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (50,), generator=g)
    kw = {"batch_size": 16, "mean": [0.3], "std": [0.4], "shuffle": False}
    cpu = list(DeviceLoader(images, labels, **kw).epoch(0))
    gpu = list(DeviceLoader(images, labels, device=CUDA, **kw).epoch(0))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == CUDA.type
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)
    aug = dict(kw, shuffle=True, augment=parse_augment("crop2+flip"), seed=3)
    a = list(DeviceLoader(images, labels, device=CUDA, **aug).epoch(1))
    b = list(DeviceLoader(images, labels, device=CUDA, **aug).epoch(1))
    c = list(DeviceLoader(images, labels, device=CUDA, **aug).epoch(2))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def test_cli_trains_and_evaluates_on_cuda(fake_fashion, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data-dir", str(fake_fashion), "--network", "fc-2x32",
            "--batch-size", "64", "--lr", "5e-3", "--no-progress", "--epochs", "3",
            "--device", str(CUDA), "--run-dir", str(run)]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["test_acc"] > 0.9
    # a checkpoint made on the GPU evaluates on the CPU and gives the same accuracy
    assert main(["eval", str(run), "--device", "cpu", "--data-dir", str(fake_fashion)]) == 0
    assert f"test accuracy: {hist[-1]['test_acc']:.4f}" in capsys.readouterr().out


def test_resume_on_cuda_continues_the_run(fake_fashion, tmp_path, monkeypatch):
    cfg = small_config(fake_fashion, model={"network": "fc-2x32", "dropout": 0.2},
                       rule={"lr": 5e-3}, data={"train_limit": 256},
                       train={"epochs": 3, "device": str(CUDA)})
    full = Trainer(cfg, tmp_path / "full", out=io.StringIO()).run()
    orig = Trainer._epoch

    def killed_in_third_epoch(self, exp, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return orig(self, exp, epoch)

    monkeypatch.setattr(Trainer, "_epoch", killed_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "split", out=io.StringIO()).run()
    monkeypatch.undo()
    resumed = Trainer(cfg, tmp_path / "split", resume=True, out=io.StringIO()).run()
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    # same draws (the CUDA RNG state is restored); GPU reductions may differ in the last bits
    for a, b in zip(resumed, full):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01)
    ckpt = runio.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert ckpt["epoch"] == 3
    assert (ckpt["cuda_rng"] is not None) == (CUDA.type == "cuda")


def test_pipeline_is_for_cpus():
    """pipeline='on' refuses a CUDA device (kernels there already run asynchronously);
    'auto' takes the sequential step there."""
    from sigprop.errors import ConfigError

    x, y = blobs(n_per_blob=16, classes=CLASSES, dim=DIM)
    x, y = x.to(CUDA), y.to(CUDA)
    forced = _rule("sigprop", CUDA, pipeline="on")
    forced.set_training(True)
    if CUDA.type == "cuda":
        with pytest.raises(ConfigError, match="for CPUs"):
            forced.train_step(x, y)
        assert not _rule("sigprop", CUDA, pipeline="auto").pipelines
    else:
        forced.train_step(x, y)
        forced.sync()


@pytest.mark.parametrize("rule", ["bp-surrogate", "sp-surrogate", "sp-voltage"])
def test_snn_fp16_autocast_with_grad_scaler_on_cuda(rule):
    """Spiking models under fp16 autocast with a GradScaler (amp auto) lower their loss,
    and the scaler's state goes into the rule's state dict."""

    torch.manual_seed(0)
    r = build_rule(rule, build_network("snn-conv", (1, 28, 28), 10), 10).to(CUDA)
    assert r.amp_on(CUDA)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28, generator=g).to(CUDA), (torch.arange(16) % 10).to(CUDA)
    first = r.train_step(x, y)[0].sum().item()
    for _ in range(6):
        last = r.train_step(x, y)[0].sum().item()
    assert math.isfinite(last) and last < first, (first, last)
    if CUDA.type == "cuda":  # fp16 needs the scaler; bf16 on a CPU does not
        assert r.scaler is not None and "scaler" in r.state_dict()
    assert r.predict(x).dtype == torch.float32
