"""How sparse targets (Sec. III-E) travel through convolutional blocks.

The paper makes a conv layer's sparse target the size of one kernel window of the
layer's input (its example: input 32x28x28, conv 32->16 3x3, dense target 32x28x28,
sparse target 10x32x3x3, so "there is no weight sharing when convolving with a sparse
target"), and leaves open how such a target goes on through later convolutions and
pooling. Our choice, exact at every module:

* Block 1 takes each class's window target ``(C_in, k, k)`` with its own conv weights
  once, without padding: ``conv(window, W)`` is ``(C_1, 1, 1)``, one output position.
* From there a target is a *constant field*: one value per channel, standing for a map
  that is that value at every position, stored as ``(m, C, 1, 1)``. Through the block's
  modules it stays one:
    - Conv2d (W, any stride, zero padding ignored): a constant field convolved is
      constant, ``sum_{a,b} W[:, :, a, b] @ t``: a 1x1 conv with the summed kernel;
    - BatchNorm: the inputs' batch statistics (running statistics in eval mode), as
      for dense targets (Sec. III-D);
    - LeakyReLU and other elementwise modules, Dropout (one draw per channel: the
      field's one value): applied as they are;
    - MaxPool2d / AvgPool2d: the field is unchanged;
    - Flatten (into a fully connected block): the field is laid out over the input
      map's positions, ``(m, C, H, W)`` flattened; from then on targets are ordinary
      dense rows, stacked with the inputs in one call.
* L_pred compares an output map ``h (n, C, H, W)`` with a field ``t (m, C, 1, 1)`` as
  with the map that is ``t`` everywhere (:func:`sigprop.functional.field_compare`):
  dot ``(sum_hw h) . t``; the logit scale is that of the dense target, c/sqrt(C H W).

What a field costs: m x C values per block instead of m x C x H x W, and a conv on it
is an (m x C_in) by (C_in x C_out) product instead of a convolution over H x W.
Borders are where the field view differs from a dense constant map under zero
padding; the field ignores them (an infinitely large map).

:func:`forward_pair` runs one block on the inputs ``h`` and the targets ``t``
(autograd); modules it does not know are a ConfigError naming them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConfigError
from .networks import Dropout

# modes of a target on its way through the network
WINDOW = "window"  # block 1's input: one kernel window per class, (m, C_in, k, k)
FIELD = "field"  # a constant field, (m, C, 1, 1)
ROWS = "rows"  # ordinary dense rows, shaped like the inputs' rows

_ELEMENTWISE = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, Dropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def conv_window(conv: nn.Conv2d, window: Tensor) -> Tensor:
    """One application of the conv to each window (no padding): (m, C_in, k, k) ->
    (m, C_out, 1, 1)."""
    return F.conv2d(window, conv.weight, conv.bias, 1, 0, conv.dilation, conv.groups)


def conv_field(conv: nn.Conv2d, field: Tensor) -> Tensor:
    """A constant field through the conv: the summed kernel, (m, C_in, 1, 1) ->
    (m, C_out, 1, 1)."""
    if conv.groups != 1:
        raise ConfigError("sparse targets through a grouped Conv2d are not supported; use "
                          "dense targets (--targets dense)")
    return F.conv2d(field, conv.weight.sum((2, 3), keepdim=True), conv.bias)


def bn_target(bn: _BatchNorm, h: Tensor, t: Tensor) -> Tensor:
    """Normalise targets with the statistics the module uses for ``h``: the batch's
    (differentiable, as for dense targets: Sec. III-D) in training, the running ones
    in eval mode. Call before ``bn(h)`` (which counts the batch in the running
    statistics)."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    if bn.training or bn.running_mean is None:
        dims = [0, *range(2, h.dim())]
        var, mean = torch.var_mean(h, dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    out = (t - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out


def forward_pair(block: nn.Module, h: Tensor, t: Tensor, mode: str) -> tuple[Tensor, Tensor, str]:
    """The block on the inputs ``h`` (as its own forward would run them) and on the
    targets ``t`` in ``mode`` (:data:`WINDOW` or :data:`FIELD`; module docstring).
    Returns (h out, t out, the targets' mode after the block)."""
    if not isinstance(block, nn.Sequential):
        raise ConfigError(f"sparse targets through convolutions need blocks that are "
                          f"nn.Sequential, got a {type(block).__name__}; use dense targets")
    for mod in block:
        if isinstance(mod, nn.Conv2d):
            if mode == ROWS:
                raise ConfigError("a Conv2d after a Flatten cannot take sparse targets")
            t = conv_window(mod, t) if mode == WINDOW else conv_field(mod, t)
            h = mod(h)
            mode = FIELD
        elif isinstance(mod, _BatchNorm):
            t = bn_target(mod, h, t)
            h = mod(h)
        elif isinstance(mod, _ELEMENTWISE):
            h, t = mod(h), mod(t)
        elif isinstance(mod, _POOLS):
            h = mod(h)  # a field is unchanged by pooling
        elif isinstance(mod, nn.Flatten):
            if mode == FIELD and h.dim() == 4:
                t = t.expand(-1, -1, *h.shape[2:])  # the field laid out over the map
            h, t = mod(h), mod(t)
            mode = ROWS
        elif isinstance(mod, nn.Linear) and mode == ROWS:
            h, t = mod(h), mod(t)
        else:
            raise ConfigError(
                f"sparse targets cannot pass a {type(mod).__name__} (known: Conv2d, "
                "BatchNorm, LeakyReLU and other elementwise modules, Dropout, MaxPool2d, "
                "AvgPool2d, Flatten, Linear after a Flatten); use dense targets")
    return h, t, mode
