"""Augmentation: parsing the setting, the whole-batch crop and flip against per-sample
references, and what the loader yields with it."""

from __future__ import annotations

import pytest
import torch
from helpers import loader, tiny, to_pixels

from sigprop.data import Augment, dataset_spec, parse_augment
from sigprop.data.augment import crop_with_offsets, flip_with_mask
from sigprop.errors import ConfigError

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


def test_parse_augment():
    svhn = dataset_spec("svhn")
    assert parse_augment("none") == Augment()
    assert parse_augment("crop") == Augment(4)
    assert parse_augment("crop8") == Augment(8)
    assert parse_augment("flip") == Augment(0, True)
    assert parse_augment("crop+flip") == parse_augment("flip+crop") == Augment(4, True)
    assert parse_augment("auto", svhn) == svhn.default_augment
    assert str(Augment(4, True)) == "crop4+flip" and str(Augment()) == "none"
    for bad in ("rotate", "crop+crop", "", "auto", "crop-4"):
        with pytest.raises(ConfigError):
            parse_augment(bad)


def slow_crop(x, padding, oy, ox):
    """Per-sample reference for crop_with_offsets."""
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    for b in range(x.shape[0]):
        canvas = torch.zeros(x.shape[1], h + 2 * padding, w + 2 * padding, dtype=x.dtype)
        canvas[:, padding : padding + h, padding : padding + w] = x[b]
        out[b] = canvas[:, int(oy[b]) : int(oy[b]) + h, int(ox[b]) : int(ox[b]) + w]
    return out


def test_crop_matches_reference():
    x, _ = tiny(7, c=2, h=5, w=6)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 7, (2, 7), generator=g)
    got = crop_with_offsets(x, 3, oy, ox)
    assert got.shape == x.shape and got.dtype == torch.uint8
    assert torch.equal(got, slow_crop(x, 3, oy, ox))
    centre = torch.full((7,), 3)
    assert torch.equal(crop_with_offsets(x, 3, centre, centre), x)
    zero = torch.zeros(7, dtype=torch.long)
    assert torch.equal(crop_with_offsets(x, 0, zero, zero), x)


def test_flip_matches_reference():
    x, _ = tiny(6)
    mask = torch.tensor([True, False, True, True, False, False])
    got = flip_with_mask(x, mask)
    for b in range(6):
        assert torch.equal(got[b], x[b].flip(-1) if mask[b] else x[b])


def test_loader_no_padding_is_identity():
    images, labels = tiny(8)
    plain = list(loader(images, labels, seed=1).epoch(0))
    crop0 = list(loader(images, labels, seed=1, augment=Augment(crop_padding=0)).epoch(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, crop0))


def test_loader_augment_outputs_are_crops_or_flips():
    images, labels = tiny(16, c=1, h=4, w=4)
    p = 2
    dl = loader(images, labels, batch_size=16, augment=Augment(p, True))
    (x, y), = dl.epoch(0)
    pixels = to_pixels(x)
    offsets = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)]
    flips_seen, crops_seen = set(), set()
    for b in range(16):
        src = images[y[b]][None]
        matches = [
            (oy, ox, f)
            for oy, ox in offsets
            for f in (False, True)
            if torch.equal(pixels[b], flip_with_mask(
                slow_crop(src, p, [oy], [ox]), torch.tensor([f]))[0])
        ]
        assert matches, f"sample {b} is no crop/flip of its source"
        flips_seen |= {m[2] for m in matches}
        crops_seen |= {m[:2] for m in matches}
    assert flips_seen == {False, True} and len(crops_seen) > 3  # really random
