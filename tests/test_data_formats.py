"""Readers of the on-disk formats (IDX, CIFAR pickles, SVHN .mat) on tiny files in the
true formats: what they return, and one clear error for a damaged or hostile file."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import tracemalloc
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.io
import torch
from helpers import (
    IDX_NAMES,
    cifar_batch,
    idx_bytes,
    make_cifar,
    make_cifar10,
    make_idx_dataset,
    make_svhn_mat,
    one_error_line,
    one_line,
    write,
)

import sigprop.data.datasets as ds
from sigprop.data import dataset_spec, load_cifar, load_dataset, load_idx, load_svhn_mat, read_idx
from sigprop.data.formats import CorruptFileError, check_idx
from sigprop.errors import DataError

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    data = make_idx_dataset(tmp_path, gz=gz)
    img_name, lbl_name = IDX_NAMES["train"]
    suffix = "" if gz else ".gz"
    images, labels = load_idx(
        tmp_path / img_name.removesuffix(suffix), tmp_path / lbl_name.removesuffix(suffix)
    )
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (6,)
    assert np.array_equal(images[:, 0].numpy(), data["train"][0])
    assert np.array_equal(labels.numpy(), data["train"][1])


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    full = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path = write(tmp_path / "imgs.idx", full[:-5], gz)
    with pytest.raises(DataError, match=r"imgs\.idx.*truncated or corrupt.*download it again"):
        read_idx(path, 3)


def test_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "x", idx_bytes(np.zeros((3, 4, 4), np.uint8)) + b"\0", gz=False)
    with pytest.raises(DataError, match="needs 64 bytes but the file has 65"):
        read_idx(path, 3)


def test_gzip_cut_short(tmp_path):
    gz = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "labels.gz"
    path.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match=r"labels\.gz.*decompress"):
        read_idx(path, 1)


def test_gzip_garbage(tmp_path):
    path = tmp_path / "junk.gz"
    path.write_bytes(b"\x1f\x8b" + b"this is not deflate data" * 4)
    with pytest.raises(DataError, match=r"junk\.gz"):
        read_idx(path, 1)


@pytest.mark.parametrize(
    "magic, ndim, match",
    [
        (b"\x01\x02\x08", 1, "bad magic"),
        (b"\x00\x00\x0d", 1, "element type 0x0d"),  # float32 IDX
        (b"\x00\x00\x08", 3, "1 dimensions, expected 3"),
    ],
)
def test_idx_bad_header(tmp_path, magic, ndim, match):
    path = write(tmp_path / "bad.idx", idx_bytes(np.zeros(5, np.uint8), magic=magic), gz=True)
    with pytest.raises(DataError, match=match):
        read_idx(path, ndim)


def test_idx_count_mismatch(tmp_path):
    imgs = write(tmp_path / "i", idx_bytes(np.zeros((3, 2, 2), np.uint8)), gz=False)
    lbls = write(tmp_path / "l", idx_bytes(np.zeros(4, np.uint8)), gz=False)
    with pytest.raises(DataError, match="4 labels for 3 images"):
        load_idx(imgs, lbls)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz", 1)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_formats(tmp_path, cifar100, as_tar):
    name = "cifar100" if cifar100 else "cifar10"
    truth = make_cifar(tmp_path / name, cifar100=cifar100, as_tar=as_tar)
    for split in ("train", "test"):
        images, labels = load_dataset(name, split, tmp_path)
        data, lab = truth[split]
        assert images.dtype == torch.uint8 and images.shape == (len(data), 3, 32, 32)
        assert labels.dtype == torch.int64
        assert np.array_equal(images.reshape(len(data), -1).numpy(), data)
        # Row layout is 1024 R, then G, then B: pixel (c, h, w) is at c*1024 + h*32 + w.
        assert images[0, 2, 5, 7] == data[0, 2 * 1024 + 5 * 32 + 7]
        assert np.array_equal(labels.numpy(), lab)  # fine labels for CIFAR-100
    assert len(load_dataset(name, "train", tmp_path)[0]) == (4 if cifar100 else 20)


def test_cifar_folder_itself(tmp_path):
    make_cifar(tmp_path)
    images, _ = load_dataset("cifar10", "test", tmp_path / "cifar-10-batches-py")
    assert images.shape == (4, 3, 32, 32)


def test_cifar_bad_pickle(tmp_path):
    write(tmp_path / "test_batch", b"\x80\x02garbage", gz=False)
    with pytest.raises(DataError, match=r"test_batch.*unpickle"):
        load_cifar(tmp_path, ["test_batch"])


def test_cifar_bad_shape(tmp_path):
    batch = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    write(tmp_path / "test_batch", pickle.dumps(batch, protocol=2), gz=False)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar(tmp_path, ["test_batch"])


def test_cifar_corrupt_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*sigprop data download cifar10"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_archive_missing_member(tmp_path):
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz"):
        pass
    with pytest.raises(DataError, match="archive lacks f/test_batch"):
        load_cifar(tmp_path / "a.tar.gz", ["test_batch"], "f")


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes (what the official CIFAR files hold), so
    ``encoding="bytes"`` loads them as bytes without any ``_codecs.encode`` global."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2 + numpy 1 did (protocol 2, numpy.core names)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


REAL_FORMATS = [
    pytest.param(lambda b: pickle.dumps(b, protocol=2), id="protocol-2"),
    pytest.param(lambda b: pickle.dumps(b), id="default-protocol"),
    pytest.param(py2_pickle, id="python2-numpy1-style"),
]


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("dump", REAL_FORMATS)
def test_real_format_cifar_still_loads(tmp_path, dump, as_tar):
    make_cifar10(tmp_path / "cifar10", as_tar=as_tar, dump=dump)
    images, labels = load_dataset("cifar10", "train", tmp_path)
    assert images.shape == (10, 3, 32, 32) and labels.shape == (10,)
    truth = cifar_batch(2, seed=0)
    assert np.array_equal(images[:2].reshape(2, -1).numpy(), truth[b"data"])
    assert labels[:2].tolist() == truth[b"labels"]


def test_py2_style_pickle_names_numpy_core():
    raw = py2_pickle(cifar_batch(1))
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw


@pytest.mark.parametrize("labels_as_list", [True, False])
def test_cifar100_arrays_and_lists(tmp_path, labels_as_list):
    spec = dataset_spec("cifar100")
    folder = tmp_path / "cifar100" / spec.archive_folder
    folder.mkdir(parents=True)
    for i, m in enumerate(ds.all_members(spec)):
        batch = cifar_batch(3, classes=100, fine=True, seed=i, labels_as_list=labels_as_list)
        batch[b"coarse_labels"] = [0, 1, 2]
        (folder / m).write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = load_dataset("cifar100", "train", tmp_path)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == list(
        np.asarray(cifar_batch(3, classes=100, fine=True, seed=0)[b"fine_labels"]))


def test_genuine_cifar_batch_still_loads(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4, 1], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = load_cifar(folder, ["test_batch"])
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [3, 1, 4, 1]
    assert np.array_equal(images.reshape(4, -1).numpy(), data)


# --------------------------------------------------------------------------- safe unpickling


class _Evil:
    """Unpickling this would call ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_pickles(marker: Path) -> list[tuple[str, bytes]]:
    import builtins
    import subprocess

    shell = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    cases = []
    for proto in (0, 2, 4, 5):
        cases += [
            ("system", pickle.dumps({b"data": _Evil(os.system, shell), b"labels": []}, proto)),
            ("exec", pickle.dumps(_Evil(builtins.exec, code), proto)),
            ("eval", pickle.dumps([_Evil(builtins.eval, code)], proto)),
            ("Popen", pickle.dumps(_Evil(subprocess.Popen, ["touch", str(marker)]), proto)),
        ]
    # A hand-written protocol-0 pickle, as an attacker would write it.
    cases.append(("system", f"cos\nsystem\n(S'{shell}'\ntR.".encode()))
    # An allowed global put to another use: _codecs.encode only turns text into latin1 bytes.
    zlib_encode = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R."
    cases.append(("_codecs.encode", zlib_encode))
    cases.append(("builtins.bytes", b"\x80\x02c__builtin__\nbytes\nJ\x00\xca\x9a;\x85R."))
    return cases


def test_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    for i, (global_name, raw) in enumerate(_evil_pickles(marker)):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "test_batch").write_bytes(raw)
        with pytest.raises(CorruptFileError, match=rf"test_batch.*contains objects a CIFAR batch "
                           rf"never holds \(.*{global_name}.*\) and was refused") as err:
            load_cifar(folder, ["test_batch"])
        one_line(err)
        assert not marker.exists(), f"case {i} ran code"


@pytest.mark.parametrize("as_tar", [False, True])
def test_malicious_pickle_through_load_dataset(tmp_path, as_tar):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(os.system, f"touch {marker}"), b"labels": []}, 2)
    make_cifar10(tmp_path / "cifar10", as_tar=as_tar, override={"test_batch": evil})
    with pytest.raises(DataError, match=r"test_batch.*system.*refused.*sigprop data download "
                       r"cifar10") as err:
        load_dataset("cifar10", "test", tmp_path)
    one_line(err)
    assert not marker.exists()
    assert len(load_dataset("cifar10", "train", tmp_path)[0]) == 10  # the others load


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _Payload(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as err:
        load_cifar(folder, ["test_batch"])
    assert "refused" in str(err.value) and "system" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists()


# --------------------------------------------------------------------------- SVHN


def test_svhn_mat(tmp_path):
    x, y = make_svhn_mat(tmp_path / "test_32x32.mat", 5)
    images, labels = load_svhn_mat(tmp_path / "test_32x32.mat")
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels[0] == 0  # 10 -> 0
    assert np.array_equal(labels.numpy(), y[:, 0] % 10)
    assert images[3, 1, 4, 9] == x[4, 9, 1, 3]  # X is (H, W, C, N)
    assert int(labels.max()) <= 9


def test_svhn_splits(tmp_path):
    folder = tmp_path / "svhn"
    make_svhn_mat(folder / "train_32x32.mat", 3, seed=1)
    make_svhn_mat(folder / "test_32x32.mat", 2, seed=2)
    assert len(load_dataset("svhn", "train", tmp_path)[0]) == 3
    with pytest.raises(DataError, match=r"extra_32x32\.mat: not found.*ufldl"):
        load_dataset("svhn", "extra", tmp_path)
    make_svhn_mat(folder / "extra_32x32.mat", 4, seed=3)
    images, labels = load_dataset("svhn", "train+extra", tmp_path)
    assert images.shape == (7, 3, 32, 32) and labels.shape == (7,)
    assert torch.equal(images[3:], load_dataset("svhn", "extra", tmp_path)[0])


def test_svhn_corrupt(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 10)
    with pytest.raises(DataError, match=r"train_32x32\.mat"):
        load_svhn_mat(tmp_path / "train_32x32.mat")


def test_svhn_wrong_shape(tmp_path):
    scipy.io.savemat(tmp_path / "t.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": [[1], [2]]})
    with pytest.raises(DataError, match=r"expected uint8 \(32, 32, 3, N\)"):
        load_svhn_mat(tmp_path / "t.mat")


# --------------------------------------------------------------------------- labels


def _svhn_with_labels(path: Path, y) -> Path:
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": y})
    return path


@pytest.mark.parametrize("y, match", [
    (np.array(["a"] * 4), r"labels are text \(first 'a'\), expected whole numbers"),
    (np.full((4, 1), np.nan), r"label nan \(at position 0\) is not a whole number"),
    (np.full((4, 1), np.inf), r"label inf \(at position 0\) is not a whole number"),
    (np.array([[1.0], [2.5], [3.0], [4.0]]), r"label 2\.5 \(at position 1\) is not a whole"),
    (np.full((4, 1), 11.0), r"labels span 11\.\.11, expected 0\.\.10"),
    (np.full((4, 1), -1e30), r"labels span -1e\+30\.\.-1e\+30, expected 0\.\.10"),
    (np.ones((2, 2)), r"y has shape \(2, 2\), expected \(4, 1\)"),
])
def test_svhn_labels_must_be_whole_numbers_in_range(tmp_path, y, match):
    path = _svhn_with_labels(tmp_path / "train_32x32.mat", y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from a NaN cast would be printed
        with pytest.raises(CorruptFileError, match=r"train_32x32\.mat: " + match) as err:
            load_svhn_mat(path)
    assert "download it again" in one_line(err)


def test_svhn_float_labels_that_are_whole_numbers_load(tmp_path):
    path = _svhn_with_labels(tmp_path / "t.mat", np.array([[10.0], [1.0], [2.0], [9.0]]))
    assert load_svhn_mat(path)[1].tolist() == [0, 1, 2, 9]


@pytest.mark.parametrize("labels, match", [
    ([0, 1.7], r"label 1\.7 \(at position 1\) is not a whole number"),
    (["0", "1"], r"labels are text \(first '0'\)"),
    ([0, float("nan")], r"label nan"),
    ([0, -1], r"labels span -1\.\.0"),
    ([0, 10**30], r"labels are Python objects"),
])
def test_cifar_labels_must_be_whole_numbers(tmp_path, labels, match):
    batch = cifar_batch(2)
    batch[b"labels"] = labels
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CorruptFileError, match=r"test_batch: " + match) as err:
            load_cifar(tmp_path, ["test_batch"])
    one_line(err)


def test_cli_svhn_text_labels_one_line(in_tmp, capsys):
    from sigprop.cli import main

    for name in ("train_32x32.mat", "test_32x32.mat"):
        _svhn_with_labels(in_tmp / name, np.array(["a"] * 4))
    rc = main(["train", "--dataset", "svhn", "--data-dir", str(in_tmp), "--network", "fc-1x32",
               "--epochs", "1", "--no-progress", "--run-dir", "r"])
    assert "labels are text" in one_error_line(capsys, rc)
    assert not (in_tmp / "r").exists()
    rc = main(["data", "check", "svhn", "--data-dir", str(in_tmp)])
    assert "svhn: split train: " in one_error_line(capsys, rc)


# --------------------------------------------------------------------------- IDX sizes


def _idx_header(dims: tuple[int, ...]) -> bytes:
    return b"\x00\x00\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def test_oversized_raw_idx_is_refused_unread(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(_idx_header((60000, 28, 28)))
    os.truncate(path, 2 << 30)  # sparse: 2 GiB, past the 1 GiB an IDX file may hold
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=r"train-images-idx3-ubyte: 2147483648 bytes, "
                           r"more than an IDX file of a dataset holds") as err:
            read_idx(path, 3)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20  # nothing of it was read
    finally:
        tracemalloc.stop()
    assert "download it again" in one_line(err)


def test_idx_size_checked_against_the_header_without_reading(tmp_path):
    path = tmp_path / "imgs"
    path.write_bytes(_idx_header((60000, 28, 28)))
    os.truncate(path, 100 << 20)  # sparse
    with pytest.raises(CorruptFileError, match=r"header \(60000, 28, 28\) needs 47040016 bytes "
                       r"but the file has 104857600"):
        check_idx(path, 3)
    path.write_bytes(_idx_header((60000, 28, 28)) + b"\0" * 100)  # claims more than it holds
    with pytest.raises(CorruptFileError, match=r"needs 47040016 bytes but the file has 116"):
        check_idx(path, 3)


def test_gzip_content_past_the_header_stops_early(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_header((100,)) + bytes(100) + bytes(64 << 20), 1))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=r"labels-idx1-ubyte\.gz: header \(100,\) needs "
                           r"108 bytes but the file has at least \d+ \(reading stopped there\)"):
            read_idx(path, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # bounded pieces: never the 64 MiB it decompresses to
    with pytest.raises(CorruptFileError, match=r"needs 108 bytes but the file has at least"):
        check_idx(path, 1)


def test_gzip_bomb_without_an_idx_header_stops_at_the_header(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(64 << 20), 1))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=r"IDX element type 0x00"):
            read_idx(path, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("gz", [True, False])
def test_idx_header_claiming_an_absurd_size(tmp_path, gz):
    path = write(tmp_path / "x", _idx_header((2**32 - 1,) * 3) + bytes(10), gz)
    with pytest.raises(CorruptFileError, match=r"claims \d+ bytes of data, more than an IDX file"):
        read_idx(path, 3)
    with pytest.raises(CorruptFileError, match=r"claims \d+ bytes of data"):
        check_idx(path, 3)


def test_idx_gzip_members_and_trailer(tmp_path):
    data = idx_bytes(np.arange(60, dtype=np.uint8).reshape(5, 3, 4))
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(data[:20]) + gzip.compress(data[20:]))  # two members
    assert check_idx(path, 3) == (5, 3, 4)  # the trailer tells the last member only: counted
    assert np.array_equal(read_idx(path, 3), np.arange(60).reshape(5, 3, 4))
    path.write_bytes(gzip.compress(data) + b"junk")
    with pytest.raises(CorruptFileError, match="data after the end of the gzip stream"):
        read_idx(path, 3)
    assert read_idx(write(tmp_path / "y", data, gz=False), 3).flags.writeable
