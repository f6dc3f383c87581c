"""The memory a batch holds, measured: the evaluation batch cut to fit, the training
batch checked before a run starts.

A batch's working memory is measured, not guessed: the rule's own step runs on two small
batches under :class:`LiveBytes`, which sees every tensor the step's operations allocate
and when it is freed; the peaks' difference gives the bytes a sample adds. (An estimate
from the blocks' output shapes missed the spiking net's T steps of unpooled maps by
about 10x: 8.7 GB resident when it evaluated 1000 samples at once.) The process's
resident memory grows by up to :data:`SLACK` times the live bytes (the heap keeps freed
blocks), so that is what a batch is charged.

The evaluation batch is cut so it holds at most :data:`EVAL_BYTES` or a quarter of the
usable memory, whichever is less: larger batches evaluate no faster, and several runs
may evaluate at once. A training batch that cannot fit stops the run before it starts
(the batch size changes the training, so it is never cut). Study:
docs/studies/batch-memory.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError
from ..resources import available_bytes, format_bytes, USABLE_FRACTION

EVAL_BYTES = 2 * 2**30  # the most one evaluation batch may hold by default
PROBE = (4, 12)  # the two probe batches (samples)
# resident growth / live peak of one evaluation at batch 500, measured: snn-conv
# bp-surrogate 1.84, sp-voltage 0.99, conv sigprop 1.07 (docs/studies/batch-memory.md)
SLACK = 2


def _storage(t: Tensor) -> tuple[int, int]:
    """(data pointer, bytes) of ``t``'s storage; (0, 0) where it has none of its own
    (a wrapper, e.g. a forward-mode AD level's: its data is counted where it is made)."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return 0, 0


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operations allocate inside the mode, live and peak.

    A storage counts from the operation that returns it until its last tensor is freed;
    outputs that share an input's storage (views, in-place results) add nothing.
    """

    def __init__(self, skip_shapes: set[tuple[int, ...]] | frozenset = frozenset()) -> None:
        super().__init__()
        self.skip_shapes = skip_shapes  # outputs of these shapes are not counted
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, tensors holding it]
        self.live_bytes = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        inputs = {_storage(a)[0] for a in given if a.layout == torch.strided}
        seen: set[int] = set()
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.layout != torch.strided or id(t) in seen:
                continue
            seen.add(id(t))
            if self.skip_shapes and tuple(t.shape) in self.skip_shapes:
                continue
            ptr, nbytes = _storage(t)
            if ptr == 0 or (ptr in inputs and ptr not in self.live):
                continue  # empty, or a view of (or in place on) a tensor made outside
            if any(a is t for a in given):
                continue  # an in-place result: the same tensor, already counted
            entry = self.live.get(ptr)
            if entry is None:
                self.live[ptr] = [nbytes, 1]
                self.live_bytes += nbytes
                self.peak = max(self.peak, self.live_bytes)
            else:
                entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


@dataclass(frozen=True)
class EvalBatch:
    """The evaluation batch a run uses, and why."""

    size: int
    asked: int
    per_sample: int  # bytes a sample adds to an evaluation batch (measured)
    fixed: int  # bytes a batch holds whatever its size (measured)
    cut: bool = False  # whether the memory limit made it smaller than asked
    limit: int = 0  # the most a batch might hold when it was chosen (limit_bytes)

    @property
    def nbytes(self) -> int:
        return self.fixed + self.size * self.per_sample

    def line(self) -> str:
        """The run log's line, e.g. ``evaluation batch: 250 (cut from 1000 ...)``."""
        held = f"about {format_bytes(self.nbytes)}, {format_bytes(self.per_sample)} a sample"
        if not self.cut:
            return f"evaluation batch: {self.size} ({held})"
        return (f"evaluation batch: {self.size}, cut from {self.asked} so one batch holds at "
                f"most {format_bytes(self.limit)} ({held}); "
                "the cut changes no result")

    def record(self) -> dict[str, int]:
        return {"size": self.size, "asked": self.asked, "cut": self.cut,
                "bytes_per_sample": self.per_sample, "bytes_fixed": self.fixed}


def measure_train(make_rule: Callable[[], Any], input_shape: tuple[int, ...],
                  num_classes: int, device: torch.device) -> tuple[int, int]:
    """(bytes a sample adds, bytes fixed) of a training step, :data:`SLACK` included,
    measured on a fresh rule from ``make_rule`` (the run's own is left untouched) after
    one unmetered step. Tensors shaped like a parameter (gradients, the optimiser's state
    and temporaries) are not counted: they are the parameters' check's to count, and at
    a probe's few samples they would hide the samples' share of the peak. The RNG is
    left as it was. The meter sees the calling thread only: ``make_rule`` should build a
    rule without an update thread (sigprop's pipeline holds about one block's tensors
    more)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    peaks = []
    with torch.random.fork_rng(devices=devices):
        rule = make_rule()
        rule.set_training(True)
        shapes = frozenset(tuple(p.shape) for p in rule.modules.parameters())
        for n in (2, *PROBE):
            x = torch.randn(n, *input_shape, device=device)
            y = torch.arange(n, device=device) % num_classes
            index = torch.arange(n, device=device) if rule.uses_sample_index else None
            if n == 2:
                rule.train_step(x, y, index=index)
                continue
            meter = LiveBytes(shapes)
            with meter:
                rule.train_step(x, y, index=index)
            peaks.append(meter.peak)
        rule.sync()
    return _per_sample(peaks)


def _per_sample(peaks: list[int]) -> tuple[int, int]:
    """(bytes a sample adds, bytes fixed) from the peaks at :data:`PROBE`'s sizes."""
    (n0, n1), (p0, p1) = PROBE, peaks
    per = max(0, -(-(p1 - p0) // (n1 - n0)))  # rounded up
    return SLACK * per, SLACK * max(0, p1 - n1 * per)


def limit_bytes(device: torch.device | str) -> int:
    """The most one evaluation batch may hold on ``device``."""
    return int(min(EVAL_BYTES, available_bytes(device) * USABLE_FRACTION / 4))


def measure(rule, input_shape: tuple[int, ...], device: torch.device) -> tuple[int, int]:
    """(bytes a sample adds, bytes fixed) of ``rule``'s evaluation step on ``device``,
    from two batches of zeros, :data:`SLACK` included. Leaves the rule's state, mode and
    the RNG as they were."""
    peaks = []
    was_training = rule.modules.training
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        rule.set_training(False)
        try:
            # a first step outside the meter: one-off work (the 16-bit check, lazy state)
            rule.eval_step(torch.zeros(1, *input_shape, device=device),
                           torch.zeros(1, dtype=torch.long, device=device))
            for n in PROBE:
                x = torch.zeros(n, *input_shape, device=device)
                y = torch.zeros(n, dtype=torch.long, device=device)
                meter = LiveBytes()
                with meter:
                    rule.eval_step(x, y)
                peaks.append(meter.peak)
        finally:
            rule.set_training(was_training)
    return _per_sample(peaks)


def choose(rule, input_shape: tuple[int, ...], asked: int, n_test: int,
           device: torch.device) -> EvalBatch:
    """The evaluation batch for ``asked`` samples a batch over ``n_test`` test samples:
    ``asked`` (or all of them, if fewer), cut to fit :func:`limit_bytes`; ConfigError
    if not even one sample fits."""
    want = max(1, min(asked, n_test))
    per, fixed = measure(rule, input_shape, device)
    limit = limit_bytes(device)
    fits = want if per == 0 else max(0, min(want, (limit - fixed) // per))
    if fits < 1:
        raise ConfigError(
            f"one evaluation sample through this network needs about "
            f"{format_bytes(fixed + per)}, more than the {format_bytes(limit)} an "
            f"evaluation batch may hold on {device.type}; choose a smaller --network")
    cut = fits < want
    if cut:  # the fewest batches of at most ``fits`` for ``want`` samples, made equal
        batches = -(-want // fits)
        fits = -(-want // batches)
    return EvalBatch(fits, asked, per, fixed, cut, limit)
