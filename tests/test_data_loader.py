"""DeviceLoader: every sample once an epoch, deterministic and resumable epochs,
normalisation, argument checks."""

from __future__ import annotations

import pytest
import torch
from helpers import loader, tiny, to_pixels

from sigprop.data import Augment, DeviceLoader
from sigprop.errors import ConfigError

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


def test_loader_covers_each_sample_once():
    images, labels = tiny(10)
    dl = loader(images, labels)
    assert len(dl) == 3 and dl.num_samples == 10
    batches = list(dl.epoch(0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(10)) and ys.tolist() != list(range(10))
    for x, y in batches:  # images travel with their labels
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(to_pixels(x), images[y])


def test_loader_deterministic_and_resumable():
    images, labels = tiny(10)
    a, b = loader(images, labels, augment=Augment(2, True), seed=3), loader(
        images, labels, augment=Augment(2, True), seed=3
    )
    list(a.epoch(0))  # a fresh loader (b) must give epoch 1 exactly as a continuing one
    e1a, e1b = list(a.epoch(1)), list(b.epoch(1))
    for (xa, ya), (xb, yb) in zip(e1a, e1b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    tail = list(b.epoch(1, start_batch=1))  # mid-epoch resume
    assert all(torch.equal(x, xa) for (x, _), (xa, _) in zip(tail, e1a[1:]))
    e2 = torch.cat([y for _, y in a.epoch(2)])
    assert not torch.equal(e2, torch.cat([y for _, y in e1a]))
    other_seed = torch.cat([y for _, y in loader(images, labels, seed=4).epoch(1)])
    assert not torch.equal(other_seed, torch.cat([y for _, y in e1a]))


def test_loader_eval_order_and_drop_last():
    images, labels = tiny(10)
    dl = loader(images, labels, shuffle=False, drop_last=True)
    assert len(dl) == 2
    ys = torch.cat([y for _, y in dl.epoch(5)])
    assert ys.tolist() == list(range(8))


def test_loader_normalisation():
    images, labels = tiny(6, c=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    dl = DeviceLoader(images, labels, batch_size=6, mean=mean, std=std, shuffle=False)
    (x, _), = dl.epoch(0)
    ref = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()) / torch.tensor(
        std
    ).view(1, 3, 1, 1).double()
    torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-5)
    (x16, _), = DeviceLoader(images, labels, batch_size=6, mean=mean, std=std, shuffle=False,
                             dtype=torch.bfloat16).epoch(0)
    assert x16.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"mean": (0.5,)}, "one per channel"),
        ({"std": (0.0, 1.0, 1.0)}, "positive"),
        ({"dtype": torch.int32}, "floating"),
    ],
)
def test_loader_bad_args(kw, match):
    images, labels = tiny(4)
    with pytest.raises(ConfigError, match=match):
        loader(images, labels, **kw)
    with pytest.raises(ConfigError, match="uint8"):
        loader(images.float(), labels)
