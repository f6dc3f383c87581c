"""check_dataset: each file's md5 against the official one, and whether each split loads."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
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


def test_cli_check_of_a_corrupt_dataset_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from helpers import idx_bytes, one_error_line

    from sigprop.cli import main

    folder = tmp_path / "fashion-mnist"
    make_idx_dataset(folder)
    assert check_dataset("fashion-mnist", folder).failure() is None
    images = np.zeros((6, 28, 28), np.uint8)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(images, magic=b"\x01\x02\x08")))
    monkeypatch.setenv("SIGPROP_DATA", str(folder))
    line = one_error_line(capsys, main(["data", "check", "fashion-mnist"]))
    assert line.startswith("sigprop: error: fashion-mnist: split train: ")
    assert "bad magic number" in line and "sigprop data download fashion-mnist" in line
    main(["data", "check", "fashion-mnist"])
    out = capsys.readouterr().out  # the per-split report stays on stdout
    assert "split train: FAILED" in out and "split test: ok" in out


def test_cli_check_of_a_malicious_cifar_archive(tmp_path, capsys):
    from helpers import make_cifar10, one_error_line

    from sigprop.cli import main

    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(f"touch {marker}"), b"labels": []}, 2)
    make_cifar10(tmp_path / "cifar10", as_tar=True, override={"data_batch_1": evil})
    line = one_error_line(capsys, main(["data", "check", "cifar10", "--data-dir",
                                        str(tmp_path)]))
    assert "cifar10: split train: " in line and "refused" in line
    assert not marker.exists()


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))
