"""Every rule's training step runs without reading a tensor's value on the host, apart
from its input checks: what asynchronous GPU dispatch and a CUDA-graph capture of the
step need. Checked on the CPU by intercepting the ops that make such a read (on a GPU
each one waits for the device), with the CPU-only checks switched off."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sigprop.rules.base as rules_base
from sigprop.errors import SigpropError
from sigprop.networks import build_network
from sigprop.registry import RULES
from sigprop.rules import build_rule

CLASSES = 4
# ops whose result a host read decides: a value read (item, bool, float), or an output
# whose size depends on the values (nonzero, masked_select, unique, bincount; and
# repeat_interleave with tensor repeats and no output_size)
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount"}
# each rule on the first of these it trains (a rule refuses the others in one line):
# network, input, dropout (spiking and Hopfield nets take none)
NETWORKS = [("conv", (1, 16, 16), 0.1), ("fc-2x16", (1, 8, 8), 0.1),
            ("hopfield-1x16", (1, 8, 8), 0.0), ("snn-conv", (1, 16, 16), 0.0)]
SIGPROP_VARIANTS = [{"targets": "sparse"}, {"signal": "label-input"}, {"fast_path": "off"},
                    {"signal": "loop-pred", "head": "classifier"}]


class HostReads(TorchDispatchMode):
    """Counts the ops of HOST_READS that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, _, overload = func.__name__.partition(".")
        if name in HOST_READS or (
                name == "repeat_interleave" and "Tensor" in overload
                and (kwargs or {}).get("output_size") is None):
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def _one_hot_on_device(y, num_classes=-1):
    """F.one_hot as on a GPU: there it checks the labels with a device assert (no host
    read); on a CPU it reads min and max."""
    return torch.zeros(*y.shape, num_classes, dtype=torch.int64).scatter_(-1, y.unsqueeze(-1), 1)


def _build(name: str, **kw):
    for net, shape, dropout in NETWORKS:
        torch.manual_seed(0)
        try:
            return build_rule(name, build_network(net, shape, CLASSES, dropout=dropout),
                              CLASSES, **kw), shape
        except SigpropError:
            continue
    raise AssertionError(f"rule {name!r} trains none of {[n for n, _, _ in NETWORKS]}")


CASES = [(name, {}) for name in RULES.names()] + [("sigprop", kw) for kw in SIGPROP_VARIANTS]


@pytest.mark.parametrize("name,kw", CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_training_step_reads_nothing_back(name, kw, monkeypatch):
    rule, shape = _build(name, **kw)
    rule.check_finite = False  # the CPU-only input checks (skipped on a GPU)
    monkeypatch.setattr(rules_base, "check_y", lambda *a, **k: None)
    monkeypatch.setattr(F, "one_hot", _one_hot_on_device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, *shape, generator=g)
    y = torch.arange(8) % CLASSES
    rule.train_step(x, y)  # first step: lazy state (Adam's, buffers) made outside the count
    rule.sync()
    reads = HostReads()
    with reads:
        for _ in range(2):
            rule.train_step(x, y)
        rule.sync()
    assert not reads.seen, f"{name} {kw}: host reads in the step: {dict(reads.seen)}"


def test_the_interceptor_sees_a_host_read():
    """The check itself: an .item() and a bincount inside the mode are counted."""
    reads = HostReads()
    with reads:
        torch.ones(3).sum().item()
        torch.bincount(torch.tensor([0, 2]))
        torch.arange(3).repeat_interleave(2)  # int repeats: the size is known, no read
        torch.arange(3).repeat_interleave(torch.tensor([1, 0, 2]))
    assert reads.seen == {"_local_scalar_dense": 1, "bincount": 1, "repeat_interleave": 1}
