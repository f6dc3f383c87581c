"""Point-to-point transport between neighbouring stages (``torch.distributed``).

A stage sends each batch's stacked rows ``[h; t]`` and its labels ``y`` to the next
stage, and nothing ever flows back: sigprop needs no gradient from above. Both sides
know every message's size in advance (an epoch's batch sizes follow from the data's
size and the batch size; the target rows from the rule, :meth:`Sigprop.stage_rows`),
so no header travels:

* :class:`Receiver` posts ``irecv`` for the next ``depth`` messages into preallocated
  contiguous buffers (a ring), so batch k+1 arrives while batch k is being learned;
* :class:`Sender` sends with ``isend`` and keeps at most ``depth`` sends in flight:
  a send completes when the receiver has taken the message, so a slow stage below
  holds back the stage above after ``depth`` batches (backpressure), and the stages
  above never wait for anything else from it.

``torch.distributed.pipelining``'s schedules (GPipe, 1F1B) are not used: they put one
loss at the last stage and send gradients back, which sigprop does not need.

A peer that dies closes its sockets; the pending operation raises at once, and it is
reported as a :class:`StageFailure` naming the peer stage.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import SigpropError

Z_TAG, Y_TAG = 0, 1


class StageFailure(SigpropError):
    """A neighbouring stage stopped (crashed, killed, or timed out)."""


def peer_lost(err: BaseException) -> str | None:
    """What a failed gloo operation says about the peer: that it closed its connection,
    or timed out; None for any other error (not a peer's)."""
    text = " ".join(str(err).split())
    low = text.lower()
    if "closed" in low or "reset" in low:
        return "it closed its connection (crashed, was killed, or stopped on an error of its own)"
    if "timed out" in low:
        return f"timed out ({text[:160]})"
    return None


def _lost(peer: str, what: str, err: BaseException) -> StageFailure:
    cause = peer_lost(err) or " ".join(str(err).split())[:160]
    return StageFailure(f"{peer} stopped while {what}: {cause}")


class Sender:
    """Non-blocking sends of (rows, labels) to stage ``peer``, at most ``depth`` in
    flight. A sent tensor is kept alive (and must not be written) until its send is
    done; sigprop's block outputs are fresh tensors each step. ``name``: the peer in
    messages (default "stage <peer + 1>"; with replicas the rank is not the stage)."""

    def __init__(self, peer: int, depth: int, name: str | None = None) -> None:
        self.peer = peer
        self.name = name or f"stage {peer + 1}"
        self.depth = depth
        self._flight: deque = deque()  # (works, tensors) of sends not yet waited for
        self.wait_s = 0.0  # time spent waiting for sends to complete (backpressure)
        self.sent = 0

    def send(self, z: Tensor, y: Tensor) -> None:
        while len(self._flight) >= self.depth:
            self._wait_oldest()
        # the labels may be a view of a receive buffer (a middle stage hands on what it
        # received), which the Receiver reuses: a copy of n int64s; z is a fresh output
        z, y = z.contiguous(), y.clone()
        try:
            works = (dist.isend(z, self.peer, tag=Z_TAG), dist.isend(y, self.peer, tag=Y_TAG))
        except RuntimeError as err:
            raise _lost(self.name, f"this stage sent it batch {self.sent + 1}", err) from None
        self._flight.append((works, (z, y)))
        self.sent += 1

    def _wait_oldest(self) -> None:
        works, _ = self._flight[0]
        t = time.perf_counter()
        try:
            for w in works:
                w.wait()
        except RuntimeError as err:
            raise _lost(self.name, f"receiving batch {self.sent - len(self._flight) + 1} "
                        "from this stage", err) from None
        finally:
            self.wait_s += time.perf_counter() - t
        self._flight.popleft()

    def flush(self) -> None:
        """Wait until every send is taken."""
        while self._flight:
            self._wait_oldest()


class Receiver:
    """Receives the messages of ``sizes`` (labels per message, rows per message) in
    order from stage ``peer`` into ``depth`` preallocated buffers, each posted ahead.
    :meth:`recv` returns views of a buffer that stay valid until ``depth - 1`` further
    calls (the caller has finished with a batch before it asks for the next). ``name``:
    as :class:`Sender`'s."""

    def __init__(self, peer: int, sizes: list[tuple[int, int]], row_shape: tuple[int, ...],
                 depth: int, dtype: torch.dtype, device: torch.device,
                 name: str | None = None) -> None:
        self.peer = peer
        self.name = name or f"stage {peer + 1}"
        self.sizes = sizes
        self.row = tuple(row_shape)
        self.depth = depth
        per_row = math.prod(self.row)
        z_max = max((r * per_row for _, r in sizes), default=0)
        y_max = max((n for n, _ in sizes), default=0)
        self._z = [torch.empty(z_max, dtype=dtype, device=device) for _ in range(depth)]
        self._y = [torch.empty(y_max, dtype=torch.int64, device=device) for _ in range(depth)]
        self._works: dict[int, tuple] = {}
        self._next = 0  # the next message recv returns
        self.wait_s = 0.0  # time spent waiting for a message to arrive
        for k in range(min(depth, len(sizes))):
            self._post(k)

    def _views(self, k: int) -> tuple[Tensor, Tensor]:
        n, rows = self.sizes[k]
        slot = k % self.depth
        z = self._z[slot][: rows * math.prod(self.row)].view(rows, *self.row)
        return z, self._y[slot][:n]

    def _post(self, k: int) -> None:
        z, y = self._views(k)
        try:
            self._works[k] = (dist.irecv(z, self.peer, tag=Z_TAG),
                              dist.irecv(y, self.peer, tag=Y_TAG))
        except RuntimeError as err:
            raise _lost(self.name, f"this stage waited for batch {k + 1}", err) from None

    def recv(self) -> tuple[Tensor, Tensor]:
        k = self._next
        if k >= len(self.sizes):
            raise IndexError("every message of this epoch has been received")
        if k >= 1 and k - 1 + self.depth < len(self.sizes):  # the previous buffer is free
            self._post(k - 1 + self.depth)
        t = time.perf_counter()
        try:
            for w in self._works.pop(k):
                w.wait()
        except RuntimeError as err:
            raise _lost(self.name, f"this stage waited for batch {k + 1} from it",
                        err) from None
        finally:
            self.wait_s += time.perf_counter() - t
        self._next += 1
        return self._views(k)


def batch_sizes(total: int, batch: int, drop_last: bool) -> list[int]:
    """The batch sizes of one epoch over ``total`` samples (as DeviceLoader makes them)."""
    count = total // batch if drop_last else -(-total // batch)
    return [min(batch, total - i * batch) for i in range(count)]


def shard(n: int, replicas: int, replica: int) -> tuple[int, int]:
    """Rows ``lo, hi`` of a batch of ``n`` that ``replica`` of ``replicas`` learns from:
    consecutive near-equal shares, the larger ones first (as ``torch.tensor_split``)."""
    base, extra = divmod(n, replicas)
    lo = replica * base + min(replica, extra)
    return lo, lo + base + (1 if replica < extra else 0)
