"""Process-level performance settings for training on the CPU.

glibc's malloc serves blocks above a (dynamic) threshold with fresh mmap'ed pages and
trims the heap top back to the OS when it frees; a sigprop step, whose per-block
tensors come and go at several sizes ((n + m) x d activations, d x d gradients),
then page-faults ~400 times per step on fc-3x1000 (measured with getrusage; backprop:
~0). Keeping freed memory in the process removes those faults. Applied by the CLI and
the benchmark, to every rule alike; a no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

_applied = False


def tune_allocator() -> bool:
    """Keep freed heap memory for reuse (glibc only). Returns True if applied."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = (
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB from the heap
        and mallopt(_M_TRIM_THRESHOLD, 256 << 20)  # keep up to 256 MiB free at the top
        and mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps
    )
    _applied = bool(ok)
    return _applied
