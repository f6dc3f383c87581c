"""Provenance records of the files a split reads: path, size, md5, whether official;
the same files load_dataset reads, and those a training run records in config.json."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import IDX, make_cifar10, make_mnist, make_svhn, md5, use_spec

import sigprop.data.datasets as ds
from sigprop.data import dataset_spec, load_dataset, split_file_records
from sigprop.errors import ConfigError

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


def _official(monkeypatch, name: str, folder: Path) -> None:
    """Make the spec's official md5s those of the files in ``folder`` (as if real)."""
    spec = dataset_spec(name)
    files = tuple(dataclasses.replace(f, md5=md5((folder / f.name).read_bytes()))
                  if (folder / f.name).is_file() else f for f in spec.files)
    use_spec(monkeypatch, dataclasses.replace(spec, files=files))


def test_records_idx(tmp_path, monkeypatch):
    folder = make_mnist(tmp_path / "mnist")
    records = split_file_records("mnist", "train", tmp_path)
    assert [r["path"] for r in records] == [str(folder / n) for n in IDX["train"]]
    for r in records:
        data = Path(r["path"]).read_bytes()
        assert r["bytes"] == len(data) and r["md5"] == md5(data)
        assert r["official_md5"] is False  # synthetic files
    _official(monkeypatch, "mnist", folder)
    assert all(r["official_md5"] is True for r in split_file_records("mnist", "test", folder))


def test_records_decompressed_are_not_comparable(tmp_path):
    make_mnist(tmp_path / "mnist", gz=False)
    records = split_file_records("mnist", "test", tmp_path)
    assert [Path(r["path"]).name for r in records] == [n.removesuffix(".gz") for n in IDX["test"]]
    assert {r["official_md5"] for r in records} == {None}


def test_records_follow_what_load_reads(tmp_path, monkeypatch):
    """With both a .gz and a decompressed copy, the record is the file actually read."""
    folder = make_mnist(tmp_path / "mnist", gz=True, seed=0)
    make_mnist(folder, gz=False, seed=5)  # other content under the decompressed names
    read: list[str] = []
    real = ds.load_idx

    def spy(*paths):
        read.extend(str(Path(p).absolute()) for p in paths)
        return real(*paths)

    monkeypatch.setattr(ds, "load_idx", spy)
    load_dataset("mnist", "train", tmp_path)
    assert read == [r["path"] for r in split_file_records("mnist", "train", tmp_path)]
    assert all(p.endswith(".gz") for p in read)


def test_records_relative_data_dir_are_absolute(tmp_path, monkeypatch):
    make_mnist(tmp_path / "data" / "mnist")
    monkeypatch.chdir(tmp_path)
    for r in split_file_records("mnist", "train", "data"):
        assert os.path.isabs(r["path"]) and Path(r["path"]).is_file()


@pytest.mark.parametrize("as_tar", [False, True])
def test_records_cifar(tmp_path, monkeypatch, as_tar):
    make_cifar10(tmp_path / "cifar10", as_tar=as_tar)
    records = split_file_records("cifar10", "train", tmp_path)
    if as_tar:
        assert [Path(r["path"]).name for r in records] == ["cifar-10-python.tar.gz"]
        assert records[0]["official_md5"] is False
        _official(monkeypatch, "cifar10", tmp_path / "cifar10")
        assert split_file_records("cifar10", "test", tmp_path)[0]["official_md5"] is True
    else:
        assert [Path(r["path"]).name for r in records] == [f"data_batch_{i}" for i in range(1, 6)]
        assert {r["official_md5"] for r in records} == {None}  # extracted members


def test_records_svhn(tmp_path):
    make_svhn(tmp_path / "svhn" / "train_32x32.mat", 2)
    make_svhn(tmp_path / "svhn" / "test_32x32.mat", 2)
    make_svhn(tmp_path / "svhn" / "extra_32x32.mat", 3)
    records = split_file_records("svhn", "train+extra", tmp_path)
    assert [Path(r["path"]).name for r in records] == ["train_32x32.mat", "extra_32x32.mat"]
    assert {r["official_md5"] for r in records} == {False}
    with pytest.raises(ConfigError, match="unknown split"):
        split_file_records("svhn", "valid", tmp_path)


def test_records_exported():
    import sigprop.data

    assert sigprop.data.split_file_records is split_file_records
    assert "split_file_records" in sigprop.data.__all__


def test_split_file_records_are_the_files_read(roots):
    for split, prefix in (("train", "train"), ("test", "t10k")):
        records = split_file_records("fashion-mnist", split, roots)
        assert sorted(Path(r["path"]).name for r in records) == [
            f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
        for r in records:
            data = Path(r["path"]).read_bytes()
            assert r["bytes"] == len(data) and r["md5"] == hashlib.md5(data).hexdigest()
            assert r["official_md5"] is False  # fake files are not the official ones
    # a decompressed copy is what gets read, and has no official md5 to compare with
    raw = roots / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((roots / "t10k-images-idx3-ubyte.gz").read_bytes()))
    (roots / "t10k-images-idx3-ubyte.gz").unlink()
    rec = {Path(r["path"]).name: r for r in split_file_records("fashion-mnist", "test", roots)}
    assert rec["t10k-images-idx3-ubyte"]["official_md5"] is None
    assert load_dataset("fashion-mnist", "test", roots)[0].shape[0] == 200


def test_config_records_the_files_read(finished, fake_fashion):
    files = json.loads((finished / "config.json").read_text())["data_files"]
    assert set(files) == {"train", "test"}
    for rec in files["train"] + files["test"]:
        path = Path(rec["path"])
        assert path.parent == fake_fashion.resolve() or path.parent == fake_fashion
        assert rec["bytes"] == path.stat().st_size
        assert rec["md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    assert {Path(r["path"]).name for r in files["test"]} == {
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
