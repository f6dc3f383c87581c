"""Loading a split: the files it reads, the checks of what they hold, empty splits refused."""

from __future__ import annotations

import gzip
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    FAST,
    IDX,
    idx_bytes,
    make_cifar10,
    make_idx_dataset,
    make_mnist,
    make_svhn,
    one_error_line,
    one_line,
    write_fake_fashion,
)

from sigprop.cli import main
from sigprop.data import check_dataset, load_dataset
from sigprop.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_idx_dataset_and_bad_split(tmp_path):
    truth = make_idx_dataset(tmp_path / "mnist", gz=False)
    images, _ = load_dataset("mnist", "test", tmp_path)
    assert np.array_equal(images[:, 0].numpy(), truth["test"][0])
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        load_dataset("mnist", "valid", tmp_path)


# --------------------------------------------------------------------------- empty splits


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_idx_split(tmp_path, gz, split):
    folder = make_mnist(tmp_path / "mnist", gz=gz)
    img, lbl = IDX[split]
    for name, arr in ((img, np.zeros((0, 28, 28), np.uint8)), (lbl, np.zeros(0, np.uint8))):
        data = idx_bytes(arr)
        path = folder / (name if gz else name.removesuffix(".gz"))
        path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=rf"{img.removesuffix('.gz')}.*holds no images.*"
                       rf"split '{split}'") as err:
        load_dataset("mnist", split, tmp_path)
    one_line(err)
    other = "test" if split == "train" else "train"
    assert len(load_dataset("mnist", other, tmp_path)[0]) == 3
    report = check_dataset("mnist", tmp_path)
    assert not report.ok and "holds no images" in {s.split: s.detail for s in report.splits}[split]


EMPTY_BATCHES = [
    pytest.param({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, id="no-rows"),
    pytest.param({b"data": [], b"labels": []}, id="empty-lists"),
    pytest.param({b"data": np.zeros((0, 3072), np.uint8), b"labels": np.zeros(0, np.int64)},
                 id="empty-arrays"),
]


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("batch", EMPTY_BATCHES)
def test_empty_cifar_batch(tmp_path, as_tar, batch):
    make_cifar10(tmp_path / "cifar10", as_tar=as_tar,
                 override={"data_batch_4": pickle.dumps(batch, protocol=2)})
    with pytest.raises(DataError, match=r"data_batch_4.*holds no images.*split 'train'") as err:
        load_dataset("cifar10", "train", tmp_path)
    one_line(err)
    assert len(load_dataset("cifar10", "test", tmp_path)[0]) == 2


def test_empty_svhn(tmp_path):
    make_svhn(tmp_path / "svhn" / "train_32x32.mat", 0)
    make_svhn(tmp_path / "svhn" / "test_32x32.mat", 2)
    with pytest.raises(DataError, match=r"train_32x32\.mat.*holds no images") as err:
        load_dataset("svhn", "train", tmp_path)
    one_line(err)
    make_svhn(tmp_path / "svhn" / "train_32x32.mat", 2)
    make_svhn(tmp_path / "svhn" / "extra_32x32.mat", 0)
    assert len(load_dataset("svhn", "train", tmp_path)[0]) == 2
    with pytest.raises(DataError, match=r"extra_32x32\.mat.*holds no images.*train\+extra"):
        load_dataset("svhn", "train+extra", tmp_path)


def test_empty_split_is_refused_at_load(roots):
    (roots / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((0, 28, 28), np.uint8))))
    (roots / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(0, np.uint8))))
    with pytest.raises(DataError, match="no images"):
        load_dataset("fashion-mnist", "test", roots)


def test_empty_test_split_fails_before_training(in_tmp, capsys):
    folder = write_fake_fashion(in_tmp / "d")
    empty = idx_bytes(torch.zeros(0, 28, 28, dtype=torch.uint8).numpy())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(empty))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(torch.zeros(0, dtype=torch.uint8).numpy())))
    t0 = time.perf_counter()
    line = one_error_line(capsys, main(["train", "--data-dir", str(folder), "--run-dir", "r",
                                        *FAST]))
    assert "no images" in line and time.perf_counter() - t0 < 10
    assert not (in_tmp / "r").exists()


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    images, labels = load_dataset("fashion-mnist", "test", REAL_FASHION)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert torch.bincount(labels).tolist() == [1000] * 10
