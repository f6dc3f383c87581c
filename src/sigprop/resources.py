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


_HALF: dict[str, tuple[bool, str]] = {}  # device type -> (16-bit pays, why), once a process


def cpu_capability() -> str:
    """What PyTorch's CPU kernels use here (``AVX2``, ``AVX512``, ...) and whether the CPU
    has native bf16 arithmetic, e.g. ``AVX512, native bf16``."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cap}, {'native' if cpu_bf16() else 'no native'} bf16"


def cpu_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX); without it PyTorch
    emulates bf16 convolutions, measured 33x slower than float32 on an AVX2 CPU."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def half_precision_pays(device: torch.device | str) -> tuple[bool, str]:
    """Whether 16-bit autocast computes faster than float32 on ``device``'s kind, and
    why: CUDA computes fp16 natively; a CPU must have native bf16 and a one-off timed
    convolution must run faster under bf16 autocast (cached for the process)."""
    kind = torch.device(device).type
    if kind not in _HALF:
        if kind == "cuda":
            _HALF[kind] = (True, "CUDA computes fp16 natively")
        elif kind != "cpu":
            _HALF[kind] = (False, f"no native 16-bit path known for {kind}")
        elif not cpu_bf16():
            _HALF[kind] = (False, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has "
                                  "no native bf16, where bf16 convolutions are emulated")
        else:
            ratio = _bf16_speedup()
            pays = ratio >= 1.1
            _HALF[kind] = (pays, f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has "
                                 f"native bf16; a timed conv ran {ratio:.2f}x as fast under "
                                 "bf16 autocast" + ("" if pays else ", not enough to pay"))
    return _HALF[kind]


def _bf16_speedup() -> float:
    """float32 time / bf16-autocast time of a 3x3 conv of 64 channels on 32 x 14 x 14 maps
    (about 0.2 GFLOP): the best of five of each, interleaved after a warm-up pair, so a
    busy machine slows both alike (one run of three in a row each read 0.11x on a
    machine where the others read 1.8-3.7x)."""
    import time

    x = torch.randn(32, 64, 14, 14)
    w = torch.randn(64, 64, 3, 3)
    best = {False: math.inf, True: math.inf}
    for i in range(6):
        for half in (False, True) if i % 2 else (True, False):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                torch.nn.functional.conv2d(x, w, padding=1)
            if i:
                best[half] = min(best[half], time.perf_counter() - t0)
    return best[False] / best[True]
