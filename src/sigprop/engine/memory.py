"""The saved-tensor meter: bytes of the tensors a training step holds for its update.

Within :meth:`SavedTensorMeter.counting` the meter sees every tensor autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``) and every tensor sigprop's fast
path keeps for a block's update (:func:`sigprop.rules.sigprop.fastpath.track_saved`). A storage counts
once, from its first save until its last holder is released; storages of the tensors in
``skip`` (the parameters: not activations) and empty ones are not counted. It counts on
any device, so it is the CPU's peak memory, where no allocator statistics exist. Used by
``sigprop bench`` (:mod:`.bench`) and ``benchmarks/throughput_memory.py``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..rules.sigprop import fastpath


def storage_key(t: Tensor) -> tuple[int, int]:
    """(the storage's data_ptr, its bytes); the tensor's own when it has no storage."""
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):
        return t.data_ptr(), t.numel() * t.element_size()


class _Held:
    """What autograd (or the fast path) holds instead of a saved tensor; dropping it
    releases the tensor from the meter."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: Tensor, key: int, meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter.release(self.key)


class SavedTensorMeter:
    """Live and peak bytes of tensors held for the update, deduplicated by storage.

    ``region`` is the part of the step running now (:meth:`enter`, e.g. from a block's
    mark or forward pre-hook): ``region_peak[r]`` is the most bytes live while ``r`` ran,
    ``region_bytes[r]`` the bytes of the storages first saved in it. With ``segment=True``
    a new region ``block<k>`` starts whenever a tensor is saved while nothing is live
    (sigprop's fast path, where module hooks would switch it off, releases each block's
    tensors before the next block saves any). ``detail=True`` keeps a line per saved
    tensor in ``log``.
    """

    def __init__(self, skip: Iterable[Tensor], detail: bool = False,
                 segment: bool = False) -> None:
        self.skip = {storage_key(t)[0] for t in skip}
        self.lock = threading.Lock()  # on CUDA, autograd releases on its own thread
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, holders]
        self.live_bytes = 0
        self.peak = 0
        self.packed = 0  # tensors saved (skipped ones aside)
        self.region = "pre"
        self.region_peak: dict[str, int] = defaultdict(int)
        self.region_bytes: dict[str, int] = defaultdict(int)
        self.segment = segment
        self.segments = 0
        self.log: list[str] | None = [] if detail else None

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Count what autograd saves and what the fast path keeps, inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack), \
                fastpath.track_saved(self.pack):
            yield

    def enter(self, region: str) -> None:
        with self.lock:
            self.region = region
            self.region_peak[region] = max(self.region_peak[region], self.live_bytes)

    def pack(self, t: Tensor) -> Tensor | _Held:
        key, size = storage_key(t)
        if key in self.skip or size == 0:
            self._note(t, size, "parameter, not counted")
            return t
        with self.lock:
            self.packed += 1
            if self.segment and self.live_bytes == 0:
                self.segments += 1
                self.region = f"block{self.segments}"
            entry = self.live.get(key)
            if entry is None:
                self.live[key] = [size, 1]
                self.live_bytes += size
                self.peak = max(self.peak, self.live_bytes)
                self.region_peak[self.region] = max(self.region_peak[self.region],
                                                    self.live_bytes)
                self.region_bytes[self.region] += size
            else:
                entry[1] += 1
            self._note(t, size, "new" if entry is None else "shares a saved storage")
        return _Held(t, key, self)

    @staticmethod
    def unpack(held: Tensor | _Held) -> Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        with self.lock:
            entry = self.live.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                self.live_bytes -= entry[0]
                del self.live[key]

    def _note(self, t: Tensor, size: int, what: str) -> None:
        if self.log is not None:
            fn = type(t.grad_fn).__name__ if t.grad_fn is not None else "-"
            self.log.append(
                f"{self.region:7} {tuple(t.shape)!s:14} {str(t.dtype)[6:]:8} {fn:26} "
                f"storage {size:9d} B  live {self.live_bytes:9d} B  {what}")


__all__ = ["SavedTensorMeter", "storage_key"]
