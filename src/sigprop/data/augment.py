"""Augmentation settings and their vectorised, whole-batch implementation on the device."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import ConfigError

DEFAULT_CROP_PADDING = 4
_CROP = re.compile(r"crop([0-9]*)")


@dataclass(frozen=True)
class Augment:
    """Random crop with ``crop_padding`` zero pixels per side (0 = off) and random h-flip."""

    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ConfigError(f"augment crop padding must be >= 0, got {self.crop_padding}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __str__(self) -> str:
        parts = [f"crop{self.crop_padding}"] if self.crop_padding else []
        parts += ["flip"] if self.flip else []
        return "+".join(parts) or "none"


class AugmentDefaults(Protocol):
    """What :func:`parse_augment` reads of a dataset; a ``DatasetSpec`` has it."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, int, int]: ...  # (C, H, W)

    @property
    def default_augment(self) -> Augment: ...


def parse_augment(text: str, spec: AugmentDefaults | None = None) -> Augment:
    """``"none" | "crop" | "cropN" | "flip" | "crop+flip" | "auto"`` -> :class:`Augment`.

    ``"auto"`` is the dataset's default (needs ``spec``); ``"crop"`` pads 4 pixels; with
    ``spec``, a padding wider than its images is a ConfigError.
    """
    text = text.strip().lower()
    if text == "auto":
        if spec is None:
            raise ConfigError("augment 'auto' needs a dataset to take the default from")
        return spec.default_augment
    if text == "none":
        return Augment()
    padding: int | None = None
    flip = False
    for part in text.split("+"):
        m = _CROP.fullmatch(part)
        if m and padding is None:
            padding = int(m.group(1) or DEFAULT_CROP_PADDING)
        elif part == "flip" and not flip:
            flip = True
        else:
            raise ConfigError(
                f"bad augment {text!r}: use none, crop, crop<N>, flip, crop+flip or auto"
            )
    augment = Augment(crop_padding=padding or 0, flip=flip)
    if spec is not None and augment.crop_padding > min(spec.shape[1:]):
        # more padding than the image is wide crops mostly (or only) black pixels, and
        # the padded batch grows with its square
        raise ConfigError(
            f"bad augment {text!r}: crop padding {augment.crop_padding} is more than the "
            f"{spec.shape[1]}x{spec.shape[2]} images of {spec.name!r} are wide; use at most "
            f"crop{min(spec.shape[1:])} (the paper pads 4)")
    return augment


def crop_with_offsets(
    x: torch.Tensor, padding: int, oy: torch.Tensor, ox: torch.Tensor
) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) at offset (oy[b], ox[b]) of its zero-padded copy.

    Offsets lie in ``[0, 2 * padding]``; offset ``padding`` is the identity.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
    # One gather for the whole batch via broadcast advanced indexing -> (B, C, H, W).
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def flip_with_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (left-right) the images of ``x`` where ``mask`` (B,) is true."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    if padding == 0:
        return x
    oy, ox = torch.randint(
        0, 2 * padding + 1, (2, x.shape[0]), generator=generator, device=x.device
    )
    return crop_with_offsets(x, padding, oy, ox)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return flip_with_mask(x, mask)


def apply_augment(x: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Crop then flip a whole batch; draws come from ``generator`` in that order."""
    if augment.crop_padding:
        x = random_crop(x, augment.crop_padding, generator)
    if augment.flip:
        x = random_flip(x, generator)
    return x
