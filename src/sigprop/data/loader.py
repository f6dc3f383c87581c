"""A loader that keeps the whole dataset on the device and builds batches there.

Small image datasets fit in accelerator memory as uint8, so batching, augmentation
and normalisation are a few whole-batch tensor ops: no workers, no host copies, no
per-sample Python.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError
from .augment import Augment, apply_augment


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; unlike ``seed * K + epoch`` distinct inputs never
    plausibly collide, so (seed, epoch, batch) streams are independent."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


_PERM_STREAM, _AUGMENT_STREAM = 0, 1


class DeviceLoader:
    """Batches ``(x float (B, C, H, W) normalised, y int64 (B,))`` from device-resident data.

    Every random draw of epoch ``e`` (the permutation and each batch's augmentation) comes
    from a generator seeded from ``(seed, e[, batch])`` alone, so an epoch is identical
    whether or not the run was resumed, and ``epoch(e, start_batch=k)`` resumes mid-epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        augment: Augment = Augment(),
        seed: int = 0,
        drop_last: bool = False,
        dtype: torch.dtype = torch.float32,
        num_classes: int | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        _validate(images, labels, batch_size, mean, std, dtype)
        if num_classes is not None:
            _check_labels(labels, num_classes)
        self.device = torch.device(device)
        # Moved once and kept as uint8: 4x smaller than float32.
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.dtype = dtype
        self.memory_format = memory_format  # of the float batches (channels-last maps)
        # x = (pixel / 255 - mean) / std folded into one multiply-add; float64 for the fold.
        c = images.shape[1]
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, c, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, c, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(self.device, dtype)
        self._shift = (-mean_t / std_t).to(self.device, dtype)
        self._generator = torch.Generator(device=self.device)

    @property
    def num_samples(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch(
        self, epoch: int, start_batch: int = 0, with_index: bool = False
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batches of ``epoch``, from batch ``start_batch`` on (for mid-epoch resume):
        (x, y), and with ``with_index`` each sample's position in the data set (B,)."""
        if start_batch < 0:
            raise ConfigError(f"start_batch must be >= 0, got {start_batch}")
        order = self._permutation(epoch) if self.shuffle else None
        b = self.batch_size
        for i in range(start_batch, len(self)):
            # Unshuffled batches are contiguous slices: views, no gather.
            idx = slice(i * b, (i + 1) * b) if order is None else order[i * b : (i + 1) * b]
            x, y = self.images[idx], self.labels[idx]
            if self.augment.enabled:
                self._generator.manual_seed(derive_seed(self.seed, epoch, _AUGMENT_STREAM, i))
                # Augment the raw uint8 pixels, before normalising: crop padding is then a
                # true black (0) pixel, as with torchvision's RandomCrop on PIL images, and
                # the gathers move 1 byte per value instead of 4.
                x = apply_augment(x, self.augment, self._generator)
            if with_index:
                where = torch.arange(i * b, i * b + len(y), device=y.device) \
                    if order is None else idx
                yield self._normalise(x), y, where
            else:
                yield self._normalise(x), y

    def _permutation(self, epoch: int) -> torch.Tensor:
        self._generator.manual_seed(derive_seed(self.seed, epoch, _PERM_STREAM))
        return torch.randperm(self.num_samples, generator=self._generator, device=self.device)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype, memory_format=self.memory_format).mul_(self._scale) \
            .add_(self._shift)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={self.num_samples}, batch_size={self.batch_size}, "
            f"batches={len(self)}, device={self.device}, shuffle={self.shuffle}, "
            f"augment={self.augment})"
        )


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels in [0, num_classes), checked once where the data enters (one host sync
    here instead of one per step: the rules check labels per step only on a CPU)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integers (class indices), got {labels.dtype}")
    if len(labels):
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ConfigError(
                f"labels span {lo}..{hi}, but there are {num_classes} classes (0.."
                f"{num_classes - 1}); check the dataset or num_classes")


def _validate(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
              mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ConfigError(
            f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dim() != 1 or len(labels) != len(images):
        raise ConfigError(
            f"labels must be (N,) with N = {len(images)} images, got {tuple(labels.shape)}"
        )
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise ConfigError(
            f"mean and std need {c} values (one per channel), got {len(mean)} and {len(std)}"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"std must be positive, got {tuple(std)}")
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating point type, got {dtype}")
