"""Checks of what the rules' public methods and constructors are given.

Each raises a SigpropError subclass (InputError for tensors, ConfigError for build
arguments) whose one line names the argument and the fix, before any state changes:
only attribute reads and, on a CPU, one small reduction (the label range).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, InputError
from ..networks import Network


def check_num_classes(num_classes: object) -> int:
    """``num_classes`` as an int; ConfigError unless it is an integer >= 2."""
    if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
            or num_classes < 2):
        raise ConfigError(
            f"num_classes must be an integer >= 2, got {num_classes!r}; pass the number "
            "of classes of the dataset")
    return int(num_classes)


def check_head_outputs(network: Network, num_classes: int) -> None:
    """The head must give one score per class: (B, num_classes) for a batch."""
    out = network.output_shape
    if out != (num_classes,):
        raise ConfigError(
            f"the network's head outputs shape {out} per sample, but there are "
            f"{num_classes} classes; give it a head with {num_classes} outputs (e.g. "
            f"nn.Linear(d, {num_classes})) or build the rule for that many classes")


def _reference(network: Network) -> Tensor | None:
    """A tensor whose dtype and device the inputs must share: the first parameter
    (or buffer); None for a network without either."""
    for tensor in network.parameters():
        return tensor
    for tensor in network.buffers():
        return tensor
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_x(x: object, network: Network) -> int:
    """Raise InputError unless ``x`` is a (B, *network.input_shape) tensor, B >= 1, of
    the parameters' dtype and on their device; returns B."""
    shape = network.input_shape
    want = f"(B, {', '.join(map(str, shape))})" if shape else "(B,)"
    if not isinstance(x, Tensor):
        raise InputError(
            f"x must be a torch.Tensor shaped {want}, got {type(x).__name__}; convert it "
            "with torch.as_tensor")
    ref = _reference(network)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else None
    if dtype is not None and x.dtype != dtype:
        fix = ("normalise images to float first (sigprop.data.DeviceLoader does)"
               if not x.is_floating_point() else f"convert it with x.to(torch.{_dtype_name(dtype)})")
        raise InputError(f"x must be {_dtype_name(dtype)} like the network's parameters, "
                         f"got {x.dtype}; {fix}")
    if dtype is None and not x.is_floating_point():
        raise InputError(f"x must be floating point, got {x.dtype}; normalise it to float")
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise InputError(f"x must be shaped {want} (a batch of network.input_shape "
                         f"{shape}), got {tuple(x.shape)}; {_reshape_hint(x, shape)}")
    if ref is not None and x.device != ref.device:
        raise InputError(
            f"x is on {x.device} but the network's parameters are on {ref.device}; move "
            f"it with x.to('{ref.device}') (or the rule with rule.to(...))")
    if x.shape[0] == 0:
        raise InputError("x is an empty batch (0 samples); skip empty batches")
    return x.shape[0]


def check_finite_x(x: Tensor) -> None:
    """Raise InputError if ``x`` holds a NaN or an infinity (one reduction over it)."""
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "an infinity"
        raise InputError(f"x holds {bad}; give finite inputs (check the data and its "
                         "normalisation), or set rule.check_finite = False to skip this check")


def _reshape_hint(x: Tensor, shape: tuple[int, ...]) -> str:
    """How to turn ``x`` into a batch of samples shaped ``shape``, if it can be."""
    if tuple(x.shape) == shape:
        return "it is one sample: add the batch axis with x.unsqueeze(0)"
    per_sample = math.prod(shape)
    if x.dim() >= 1 and x.shape[0] and x[0].numel() == per_sample:
        return f"reshape it with x.view(len(x), *{shape})"
    return "check that the data matches the network (built for samples shaped " \
        f"{shape})"


def check_y(y: object, n: int, num_classes: int, device: torch.device) -> None:
    """Raise InputError unless ``y`` is an int64 (n,) tensor on ``device``; on a CPU
    also unless every label is in [0, num_classes) (one ``aminmax``: on an accelerator
    that read would sync with the host every step, so there the loader checks the
    labels once, where the data enters)."""
    if not isinstance(y, Tensor):
        raise InputError(
            f"y must be a torch.Tensor of int64 class indices shaped (B,), got "
            f"{type(y).__name__}; convert it with torch.as_tensor(y, dtype=torch.int64)")
    if y.dtype != torch.int64:
        raise InputError(f"y must be int64 class indices, got {y.dtype}; convert it with "
                         "y.long() (one-hot or soft labels: take y.argmax(1) first)")
    if y.dim() != 1:
        if y.numel() == n and y.dim() > 1:
            fix = "flatten it with y.view(-1)"
        elif y.dim() == 0:
            fix = "give one label per sample"
        else:
            fix = "give one class index per sample (one-hot labels: y.argmax(1))"
        raise InputError(f"y must be shaped (B,) = ({n},), got {tuple(y.shape)}; {fix}")
    if len(y) != n:
        raise InputError(f"x holds {n} samples but y holds {len(y)} labels; give one label "
                         "per sample")
    if y.device != device:
        raise InputError(f"y is on {y.device} but x is on {device}; move it with "
                         f"y.to('{device}')")
    if y.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(y))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"y holds the label {bad}, outside 0..{num_classes - 1} for {num_classes} "
                "classes; labels must be class indices (check the dataset or num_classes)")


def check_index(index: object, n: int, device: torch.device) -> None:
    """``index`` must be (n,) int64 sample positions (>= 0) on ``device``."""
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.dim() != 1 \
            or len(index) != n or index.device != device:
        raise InputError(f"index must be an int64 tensor of the {n} samples' positions in the "
                         f"training set, on {device}; got "
                         f"{getattr(index, 'shape', type(index).__name__)}")
    if device.type == "cpu" and n and int(index.min()) < 0:
        raise InputError("index holds a negative position; give each sample's position "
                         "in the training set")


def check_batch_statistics(network: nn.Module, n: int) -> None:
    """Raise InputError if a batch of ``n`` < 2 samples meets a BatchNorm in training
    mode: its batch variance is zero, so it would normalise every value to its bias
    (the fast path trained on like that; torch raises elsewhere)."""
    if n >= 2:
        return
    for m in network.modules():
        if isinstance(m, _BatchNorm) and m.training:
            raise InputError(
                f"x holds {n} sample, but the network's BatchNorm in training mode needs "
                "at least 2 (one sample has zero variance); use batches of >= 2 samples "
                "(drop a last batch of one), or rule.set_training(False) to evaluate")
