"""The memory layout of a run's conv maps: NCHW, or channels-last (NHWC in memory).

oneDNN, PyTorch's CPU convolution library, convolves channels-last maps without
reordering them, so the conv steps of most rules are faster on them; not every rule's
(LL-FA's heads pool slower so: docs/studies/fast-path.md "Channels-last maps"). ``auto``
lays a conv network out channels-last for the rules that declare it pays
(``channels_last_pays``, measured) on x86 CPUs with AVX2 or AVX-512 kernels, and keeps
NCHW elsewhere (GPUs and other CPUs are not measured; spiking networks compute on
[T, N, ...] maps). A layout changes no update beyond float rounding; dropout masks are
drawn in memory order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import RULES

LAYOUTS = ("auto", "nchw", "channels-last")
FORMATS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def _has_conv(network: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in network.modules())


def resolve_layout(setting: str, network: nn.Module, network_name: str, rule: str,
                   device: torch.device) -> tuple[str, str]:
    """(layout, why) for ``setting`` (one of :data:`LAYOUTS`) on ``network`` (named
    ``network_name``) trained by ``rule`` (a registered name) on ``device``: "nchw" or
    "channels-last", and the reason printed beside it. A ConfigError where channels-last
    is asked for a network it cannot lay out."""
    if setting not in LAYOUTS:
        raise ConfigError(f"train.layout must be {', '.join(LAYOUTS)}, got {setting!r}")
    spiking = network_name.startswith("snn-")
    if setting == "channels-last":
        if spiking:
            raise ConfigError(
                f"--layout channels-last: {network_name} is a spiking network, whose maps "
                "are [T, N, C, H, W]; use --layout nchw (or auto)")
        if not _has_conv(network):
            raise ConfigError(
                f"--layout channels-last lays out conv maps, and {network_name} has no conv "
                "layer; use --layout nchw (or auto)")
        return "channels-last", "asked for"
    if setting == "nchw":
        return "nchw", "asked for"
    if not _has_conv(network):
        return "nchw", "auto: no conv layer"
    if spiking:
        return "nchw", "auto: spiking networks compute on [T, N, C, H, W] maps"
    if not RULES.get(rule).channels_last_pays:
        return "nchw", f"auto: {rule}'s step is not faster on channels-last maps (measured)"
    if device.type != "cpu":
        return "nchw", f"auto: channels-last is measured on CPUs only, not on {device.type}"
    kernels = torch.backends.cpu.get_cpu_capability()
    if kernels not in ("AVX2", "AVX512"):
        return "nchw", f"auto: channels-last is measured with AVX2/AVX-512 kernels, not {kernels}"
    return "channels-last", f"auto: {rule} on a conv network, a CPU with {kernels} kernels"


def apply_layout(network: nn.Module, layout: str) -> nn.Module:
    """``network`` with its 4-d parameters and buffers laid out as ``layout`` (in place)."""
    return network.to(memory_format=FORMATS[layout])
