"""How much memory this machine (or a CUDA device) has, and refusing work that cannot fit.

Checks run before anything is allocated, so an absurd size (``fc-3x1000000000``, a crop
padding of 100000) stops with one line instead of dying in the allocator or swapping.
"""

from __future__ import annotations

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
