"""How much memory this machine (or a CUDA device) has, and refusing work that cannot fit.

Checks run before anything is allocated, so an absurd size (``fc-3x1000000000``, a crop
padding of 100000) stops with one line instead of dying in the allocator or swapping.
"""

from __future__ import annotations

import math
import os

import torch

from .errors import ConfigError

# Leave room for the interpreter, the data and everything not counted in an estimate.
USABLE_FRACTION = 0.8


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for new allocations on ``device``: MemAvailable (Linux) or the
    physical memory on a CPU, ``torch.cuda.mem_get_info`` on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_fits(nbytes: float, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Raise ConfigError if ``nbytes`` exceed the usable memory of ``device``.

    ``what`` says what needs the memory ("fc-3x1000000000: 4.0e9 parameters"), ``fix``
    what to change.
    """
    have = available_bytes(device) * USABLE_FRACTION
    if nbytes > have:
        raise ConfigError(
            f"{what} need about {format_bytes(nbytes)}, more than the "
            f"{format_bytes(have)} usable on {torch.device(device).type}; {fix}"
        )


def cpu_count() -> int:
    """Processors this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    """The most intra-op threads a setting may ask for: four per processor (more only
    wait on each other; a count far beyond it crashes the thread pool)."""
    return 4 * cpu_count()


def check_threads(n: object, flag: str) -> int:
    """``n`` threads: an integer from 1 to :func:`max_threads`; else ConfigError."""
    top = max_threads()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
        raise ConfigError(f"{flag} must be an integer from 1 to {top} (four per processor of "
                          f"this machine's {cpu_count()}), got {n!r}")
    return n


# resident memory of one process that imports torch and builds a small network
PROCESS_BYTES = 400 * 2**20


def check_processes(n: int, what: str, fix: str) -> None:
    """``n`` worker processes must be at most four per processor and fit in memory."""
    top = max_threads()
    if n > top:
        raise ConfigError(f"{what} would start {n} processes, more than the {top} this "
                          f"machine runs (four per processor); {fix}")
    check_fits(n * PROCESS_BYTES, f"{what}: {n} processes", fix)


# float32 tensors a training step keeps per block output value: the output and its
# input, BatchNorm's pre- and post-activation, gradients of each, slack (an upper bound
# for backprop, which keeps every block's; sigprop keeps one block's at a time)
ACTIVATION_COPIES = 8


def step_bytes(batch: int, input_shape: tuple[int, ...],
               block_shapes: list[tuple[int, ...]]) -> int:
    """An upper bound of the bytes one training step on ``batch`` samples allocates for
    activations (float32)."""
    values = math.prod(input_shape) + sum(math.prod(s) for s in block_shapes)
    return batch * values * 4 * ACTIVATION_COPIES
