"""`sigprop reproduce` checks the data it needs is readable (headers and sizes, nothing
loaded) before OUT is made: a damaged file is one line and exit code 2, not a failed run each."""

from __future__ import annotations

import gzip
import re
import shutil

import numpy as np
import pytest
from helpers import idx_bytes, make_cifar10, make_svhn, one_error_line

from sigprop.cli import main
from sigprop.data import check_split_files, formats
from sigprop.errors import DataError

pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


def _damage_magic(path):
    path.write_bytes(gzip.compress(b"\x01\x02" + gzip.decompress(path.read_bytes())[2:]))


def _cut_short(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _decompressed_too_long(path):
    raw = gzip.decompress(path.read_bytes())
    path.unlink()
    path.with_suffix("").write_bytes(raw + b"\0" * 10)


def _fewer_labels(path):
    labels = path.with_name("train-labels-idx1-ubyte.gz")
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))


@pytest.mark.parametrize("damage, match", [
    (_damage_magic, r"bad magic number 0x01020803"),
    (_cut_short, r"cannot decompress"),
    (_decompressed_too_long, r"needs \d+ bytes but the file has \d+"),
    (_fewer_labels, r"7 labels for \d+ images"),
])
def test_damaged_dataset_stops_before_out_is_made(in_tmp, fake_fashion, capsys, damage, match):
    data = in_tmp / "data"
    shutil.copytree(fake_fashion, data)
    damage(data / "train-images-idx3-ubyte.gz")
    rc = main(["reproduce", "table6-fmnist", "--budget", "smoke", "--data-dir", str(data),
               "--out", "ro", "--no-progress"])
    line = one_error_line(capsys, rc)
    assert "table6-fmnist needs dataset 'fashion-mnist', whose split 'train' cannot be read" \
        in line
    assert "sigprop data download fashion-mnist" in line
    assert re.search(match, line), line
    assert not (in_tmp / "ro").exists()


def test_preflight_reads_headers_not_data(fake_fashion, monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("the preflight loaded a file")

    monkeypatch.setattr(formats, "read_idx", no_loading)
    monkeypatch.setattr(formats._Gunzip, "count", no_loading)  # the trailer's size suffices
    paths = check_split_files("fashion-mnist", "train", fake_fashion)
    assert [p.name for p in paths] == ["train-images-idx3-ubyte.gz",
                                       "train-labels-idx1-ubyte.gz"]


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_and_svhn_files_checked_by_their_first_bytes(in_tmp, as_tar):
    make_cifar10(in_tmp / "cifar10", as_tar=as_tar)
    assert check_split_files("cifar10", "test", in_tmp)
    bad = (in_tmp / "cifar10" / "cifar-10-python.tar.gz" if as_tar
           else in_tmp / "cifar10" / "cifar-10-batches-py" / "test_batch")
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=r"not a (gzip file|pickle) \(starts 0x3c.*sigprop data "
                       r"download cifar10"):
        check_split_files("cifar10", "test", in_tmp)
    for split in ("train", "test"):
        make_svhn(in_tmp / "svhn" / f"{split}_32x32.mat", 3)
    assert check_split_files("svhn", "test", in_tmp)
    (in_tmp / "svhn" / "test_32x32.mat").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=r"test_32x32\.mat: not a MATLAB file"):
        check_split_files("svhn", "test", in_tmp)
