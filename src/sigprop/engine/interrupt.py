"""Interrupts and errors at a process's edge: SIGTERM raised as :class:`Terminated` (a
KeyboardInterrupt, told apart from Ctrl-C for the message and the exit code), and an
error's message on one line. Used by ``sigprop`` and by each stage process."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every cleanup (partial downloads,
    temporary checkpoint files, the run folder's lock) runs as on Ctrl-C."""

    code = 128 + signal.SIGTERM


def on_sigterm(signum, frame) -> None:
    """A SIGTERM handler: raise :class:`Terminated` (once)."""
    # once: a second SIGTERM while the first one's cleanup runs would cut it short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` (in the main thread; a handler can be set
    only there), and the previous handler is back afterwards."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def one_line(err: Exception) -> str:
    """The message on one line, however the cause (a path, an OS message) was written."""
    return " ".join(str(err).split()) or type(err).__name__
