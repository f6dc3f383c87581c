"""The built-in datasets' specs: shapes, statistics, default augmentation, official md5s."""

from __future__ import annotations

import pytest

from sigprop.data import Augment, dataset_spec
from sigprop.errors import ConfigError
from sigprop.registry import DATASETS

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


def test_specs():
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"):
        spec = dataset_spec(name)
        assert len(spec.mean) == len(spec.std) == spec.shape[0]
    assert dataset_spec("fashion-mnist").mean == (0.2860,)
    assert dataset_spec("cifar100").num_classes == 100
    assert dataset_spec("mnist").default_augment == Augment()
    assert dataset_spec("cifar10").default_augment == Augment(4, True)
    assert dataset_spec("svhn").default_augment == Augment(4, False)  # no flip for digits
    with pytest.raises(ConfigError, match="choose one of"):
        dataset_spec("imagenet")


def test_spec_checksums():
    # The official md5s (as torchvision uses them); a typo would make every download fail.
    got = {f.name: f.md5 for n in DATASETS.names() for f in dataset_spec(n).files}
    assert got["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert got["extra_32x32.mat"] == "a93ce644f1a588dc4d68dda5feec44a7"
    assert {f.md5 for f in dataset_spec("mnist").files} == {
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c",
    }
