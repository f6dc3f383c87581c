"""Process-level performance settings for training on the CPU.

glibc's malloc serves blocks above a (dynamic) threshold with fresh mmap'ed pages and
trims the heap top back to the OS when it frees, so a step whose tensors come and go at
several sizes ((n + m) x d activations, d x d gradients) page-faults every time; blocks
above glibc's 32 MiB cap on that threshold (a spiking net's ~200 MiB tensors) are
mmap'ed afresh at every allocation whatever the threshold. So mmap is turned off
(M_MMAP_MAX = 0: every block comes from the heap, freed ones are reused) and up to 1 GiB
of free memory at the heap's top is kept. Applied by the CLI and the benchmarks, to
every rule alike; a no-op where glibc is not the allocator. Measured (page faults, step
times): docs/studies/allocator.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

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
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # (the most glibc takes; kept if the next fails)
        and mallopt(_M_MMAP_MAX, 0)  # every block from the heap, none mmap'ed afresh
        and mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB free at the top
        and mallopt(_M_TOP_PAD, 64 << 20)  # grow the heap in 64 MiB steps
    )
    _applied = bool(ok)
    return _applied
