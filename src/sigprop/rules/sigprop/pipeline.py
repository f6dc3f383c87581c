"""Block updates on a second thread, overlapping the forward sweep (``pipeline``).

A sigprop block's update needs nothing from the blocks after it, and the next
block's forward needs nothing from that update: only the *next step's* forward of
the same block does. So while the main thread goes on with block i+1 (and, at the
end of a step, with the next batch), a worker thread can run block i's BatchNorm
backward, compute its weight gradient and take its Adam step. Every block is updated
from the same gradient as in the sequential step, in the same order; the forward of
block i in step s+1 waits until block i's update of step s is done. What changes is only when an
update finishes: after ``train_step`` returns, updates may still be running, and
:meth:`UpdateWorker.sync` waits for them (the rule's eval, state_dict,
set_training and the trainer's epoch end call it).

Backprop cannot do this: its first layer's gradient exists only after the whole
backward pass (backward locking, Sec. I of the paper). :func:`queue_update` queues one
block's update: its written-out backward in two stages, then its Adam step.

On a CPU each thread gets half of the intra-op threads while updates are in flight
(restored by ``sync``); results are reproducible run to run, and equal the
sequential step's bit for bit when both run single-threaded, up to float rounding
otherwise (tests/test_pipeline.py).
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Protocol

import torch
from torch import Tensor
from torch.optim import optimizer as _optimizer
from torch.optim.adam import adam as _adam

from ...errors import TrainingError


def adam_group_step(optimizer: torch.optim.Adam, group: dict, lr: float) -> None:
    """``optimizer.step()`` for one parameter group, with the learning rate ``lr``
    (captured when the update was queued). The same arithmetic as ``Adam.step``,
    whose per-group body this repeats through the functional ``adam``."""
    params: list[Tensor] = []
    grads: list[Tensor] = []
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    max_exp_avg_sqs: list[Tensor] = []
    state_steps: list[Tensor] = []
    has_complex = optimizer._init_group(
        group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    beta1, beta2 = group["betas"]
    _adam(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
        lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
        maximize=group["maximize"], foreach=group["foreach"],
        capturable=group["capturable"], differentiable=group["differentiable"],
        fused=group["fused"], grad_scale=None, found_inf=None,
        decoupled_weight_decay=group["decoupled_weight_decay"],
    )


def group_stepping_unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why :func:`adam_group_step` cannot stand in for ``optimizer.step()``, or None."""
    if type(optimizer) is not torch.optim.Adam:
        return f"the optimizer is a {type(optimizer).__name__}, not torch.optim.Adam"
    if not hasattr(optimizer, "_init_group"):
        return "this PyTorch's Adam has no per-group step"
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or getattr(_optimizer, "_global_optimizer_pre_hooks", None)
            or getattr(_optimizer, "_global_optimizer_post_hooks", None)):
        return "the optimizer has step hooks, which only Optimizer.step runs"
    return None


class GroupSteps:
    """Each slot's parameter group of one Adam (``names[slot]``: the group's name, None
    or absent: no group), stepped apart on the update thread."""

    def __init__(self, optimizer: torch.optim.Adam, names: Sequence[str | None]) -> None:
        self.optimizer = optimizer
        # indices, not the group dicts: load_state_dict replaces those
        index = {g["name"]: k for k, g in enumerate(optimizer.param_groups)}
        self._index = [index.get(name) for name in names]

    def queued(self, slot: int) -> Callable[[], None] | None:
        """The slot's Adam step with the learning rate of now (when the update is
        queued), gradients dropped after; None if the slot has no group."""
        k = self._index[slot]
        if k is None:
            return None
        optimizer = self.optimizer
        group = optimizer.param_groups[k]
        lr = group["lr"]

        def step() -> None:
            adam_group_step(optimizer, group, lr)
            for p in group["params"]:
                p.grad = None

        return step


class Backward(Protocol):
    """A block's written-out backward in two stages; the next block's BatchNorm
    forward waits for the first (:meth:`UpdateWorker.staged`)."""

    def first(self) -> None: ...

    def second(self) -> None: ...


_LIVE: weakref.WeakSet = weakref.WeakSet()  # workers with a running thread


@atexit.register
def _stop_all() -> None:
    """Stop every worker thread before the interpreter tears down (a thread still in
    a torch op at shutdown aborts the process, e.g. after Ctrl-C in a training run)."""
    for worker in list(_LIVE):
        with suppress(Exception):
            worker._stop_thread()


class _Shared:
    """What the worker thread sees (not the UpdateWorker, so that dropping the
    worker stops the thread)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.submitted = 0
        self.finished = 0
        self.staged = 0  # updates past their first stage (UpdateWorker.stage_done)
        self.marked = False  # the running update has marked its stage
        self.error: BaseException | None = None
        self.lagging = False  # UpdateWorker.lagging
        self.need: tuple[str, int] | None = None  # what the main thread waits for

    def may_go(self) -> bool:
        """Whether the worker may do its next piece of work: always, unless lagging;
        then only while the main thread waits for something not yet done. Call with
        ``cond`` held."""
        if not self.lagging:
            return True
        return self.need is not None and getattr(self, self.need[0]) < self.need[1]

    def mark(self) -> None:
        """The running update has passed its first stage."""
        with self.cond:
            self.staged += 1
            self.marked = True
            self.cond.notify_all()
            while not self.may_go():
                self.cond.wait()


def _run(shared: _Shared, threads: int) -> None:
    torch.set_num_threads(threads)
    while True:
        fn = shared.jobs.get()
        if fn is None:
            return
        with shared.cond:
            while not shared.may_go():
                shared.cond.wait()
            shared.marked = False
        try:
            if shared.error is None:
                with torch.no_grad():
                    fn()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            shared.error = err
        del fn
        with shared.cond:
            if not shared.marked:  # an update without stages: staged when finished
                shared.staged += 1
            shared.finished += 1
            shared.cond.notify_all()


class UpdateWorker:
    """One background thread running queued updates in order, one slot per block.

    ``submit(slot, fn)`` queues ``fn``; ``ready(slot)`` blocks until the slot's last
    update is done *and* at most one update is still queued or running, which bounds
    the tensors alive; ``staged()`` until every queued update has called
    ``stage_done()`` (its first stage: in sigprop, BatchNorm's backward). An exception
    in an update is raised by the next wait; later updates are skipped.
    """

    def __init__(self, slots: int) -> None:
        self._s = _Shared()
        self._last = [0] * slots  # sequence number of each slot's last update
        self._thread: threading.Thread | None = None
        self._threads = 0  # intra-op threads of the worker
        self._saved_threads: int | None = None  # the main thread's count while active
        self._pid = os.getpid()

    # --- main-thread side ----------------------------------------------------------
    def begin(self) -> None:
        """Split the intra-op threads between the main thread and the worker (from
        the first update after a sync until the next sync)."""
        self._raise()
        if self._saved_threads is not None:
            return
        total = torch.get_num_threads()
        worker = max(1, total // 2)
        if self._pid != os.getpid():  # a forked child: the parent's thread is not here
            self._thread, self._pid = None, os.getpid()
        if self._thread is None or worker != self._threads:
            self._stop_thread()
            self._threads = worker
            self._thread = threading.Thread(target=_run, args=(self._s, worker),
                                            name="sigprop-updates", daemon=True)
            self._thread.start()
            _LIVE.add(self)
        self._saved_threads = total
        torch.set_num_threads(max(1, total - worker))

    @property
    def active(self) -> bool:
        """True between ``begin`` and ``sync``."""
        return self._saved_threads is not None

    def submit(self, slot: int, fn: Callable[[], None]) -> None:
        s = self._s
        with s.cond:
            s.submitted += 1
            self._last[slot] = s.submitted
        s.jobs.put(fn)

    def ready(self, slot: int) -> None:
        """Wait for ``slot``'s last update, and until at most one other is pending."""
        self._wait_for("finished", max(self._last[slot], self._s.submitted - 1))

    def wait(self, slot: int) -> None:
        """Wait for ``slot``'s last update only."""
        self._wait_for("finished", self._last[slot])

    def staged(self) -> None:
        """Wait until every queued update has passed its first stage (see
        :meth:`stage_done`)."""
        self._wait_for("staged", self._s.submitted)

    def stage_done(self) -> None:
        """Called by a running update: its first stage is done (what :meth:`staged`
        waits for). An update that never calls it counts as staged when it ends."""
        self._s.mark()

    def _wait_for(self, counter: str, target: int) -> None:
        """Wait until ``target`` updates have finished (``counter`` "finished") or
        passed their first stage ("staged")."""
        s = self._s
        with s.cond:
            if getattr(s, counter) < target:
                s.need = (counter, target)
                s.cond.notify_all()
                while getattr(s, counter) < target and s.error is None:
                    s.cond.wait()
                s.need = None
        self._raise()

    def drain(self) -> None:
        """Wait for every queued update (the threads stay split)."""
        self._wait_for("finished", self._s.submitted)

    def sync(self) -> None:
        """Wait for every queued update; give the main thread its threads back."""
        try:
            self.drain()
        finally:
            if self._saved_threads is not None:
                torch.set_num_threads(self._saved_threads)
                self._saved_threads = None

    @contextmanager
    def lagging(self) -> Iterator[None]:
        """Within: the worker does each piece of work (an update's start, its second
        stage) only while the main thread waits for one not yet done, so the forward
        sweep runs as far ahead as allowed and holds the most tensors it ever holds
        at once (for memory measurements and tests)."""
        s = self._s
        with s.cond:
            s.lagging = True
        try:
            yield
        finally:
            with s.cond:
                s.lagging = False
                s.cond.notify_all()

    def close(self) -> None:
        """Wait for the updates, then stop the thread (a later ``begin`` restarts it)."""
        try:
            self.sync()
        finally:
            self._stop_thread()

    # --- internals -------------------------------------------------------------------
    def _raise(self) -> None:
        err = self._s.error
        if err is not None:
            raise TrainingError(
                f"a block's update failed on the update thread ({type(err).__name__}: "
                f"{err}); rerun with --pipeline off to see it in place"
            ) from err

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._s.jobs.put(None)
            self._thread.join()
            self._thread = None

    def __reduce__(self):
        """Copies and pickles get a fresh, idle worker (the owner syncs first)."""
        return (UpdateWorker, (len(self._last),))

    def __del__(self) -> None:
        # no join: the thread ends after its queue; at interpreter shutdown the queue
        # may already be gone
        with suppress(Exception):
            if self._thread is not None:
                self._s.jobs.put(None)


def queue_update(worker: UpdateWorker, slot: int, backward: Backward | None,
                 step: Callable[[], None] | None) -> None:
    """Queue slot's update on ``worker``: ``backward``'s first stage (then the stage is
    done), its second, then ``step`` (:meth:`GroupSteps.queued`)."""
    def update() -> None:
        nonlocal backward
        if backward is not None:
            backward.first()
            worker.stage_done()
            backward.second()
            backward = None
        if step is not None:
            step()

    worker.submit(slot, update)
