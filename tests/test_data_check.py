"""check_dataset: each file's md5 against the official one, and whether each split loads."""

from __future__ import annotations

import pytest
from helpers import make_cifar, make_idx_dataset

from sigprop.data import check_dataset

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


def test_check_dataset(tmp_path):
    make_idx_dataset(tmp_path / "mnist")
    report = check_dataset("mnist", tmp_path)
    assert report.directory == tmp_path / "mnist"
    assert {f.status for f in report.files} == {"md5 mismatch"}  # synthetic files
    assert report.ok and [s.split for s in report.splits] == ["train", "test"]
    assert "split train: ok - 6 images" in report.summary()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bxx")
    report = check_dataset("mnist", tmp_path)
    assert not report.ok and "t10k-images" in report.splits[1].detail


def test_check_dataset_decompressed_and_extracted(tmp_path):
    make_idx_dataset(tmp_path / "mnist", gz=False)
    assert {f.status for f in check_dataset("mnist", tmp_path).files} == {"decompressed"}
    make_cifar(tmp_path / "cifar10")
    report = check_dataset("cifar10", tmp_path)
    assert report.ok and report.files[0].status == "extracted"
