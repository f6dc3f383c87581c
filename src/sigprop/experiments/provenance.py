"""Where a number came from: the machine, the versions, the code's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..engine.runio import versions
from ..resources import cpu_capability

_SOURCE = Path(__file__).resolve().parents[1]  # the sigprop package folder


def machine() -> dict[str, Any]:
    """CPU model, its kernels' capability (AVX2, AVX512, ...; native bf16 or not), cores,
    memory, intra-op threads and GPU of this machine."""
    return {
        "cpu": _cpu_model(),
        "cpu_capability": cpu_capability(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line: ``Intel Xeon ..., 2 cores, 24 GiB, 2 torch threads, no GPU``."""
    mem = m.get("memory_gib")
    cpu = str(m.get("cpu") or "unknown CPU")
    if m.get("cpu_capability"):
        cpu += f" ({m['cpu_capability']})"
    parts = [cpu, f"{m.get('cores')} cores",
             f"{mem:.0f} GiB" if isinstance(mem, (int, float)) else "memory unknown",
             f"{m.get('torch_threads')} torch threads", f"GPU {m['gpu']}" if m.get("gpu")
             else "no GPU"]
    return ", ".join(parts)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def source_commit() -> str:
    """The git commit of the sigprop source that runs (``+ uncommitted changes`` when
    the checkout differs from it), or why there is none."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return f"unknown (sigprop {versions()['sigprop']}, not run from a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def provenance() -> dict[str, Any]:
    """Machine, versions and commit, for a manifest or a report."""
    return {"machine": machine(), "versions": versions(), "commit": source_commit()}
