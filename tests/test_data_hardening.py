"""Hardening of sigprop.data (issue 8): every bad input is one clear SigpropError line.

Covers: an explicit data location is used or fails (never a silent fallback), provenance
records of the files a split reads, empty splits, CIFAR pickles that cannot run code, and
downloads bounded in time, checked before the network and leaving no ``.part`` behind.
Servers are real sockets on 127.0.0.1 with sub-second timeouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.io
from conftest import _idx, write_cifar_members, write_fake_fashion

import sigprop.data.datasets as ds
from sigprop.data import (
    check_dataset,
    dataset_spec,
    download_dataset,
    download_file,
    find_dataset_dir,
    load_cifar,
    load_dataset,
    split_file_records,
)
from sigprop.data.formats import CorruptFileError
from sigprop.errors import ConfigError, DataError, SigpropError

IDX = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_IDX = IDX["train"] + IDX["test"]


@pytest.fixture(autouse=True)
def _isolated(isolated_data):
    """No real dataset is visible; system and cache roots are empty temp folders."""
    return isolated_data


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert isinstance(err.value, SigpropError)
    return msg


# --------------------------------------------------------------------------- file writers


def idx_bytes(arr: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) \
        + arr.tobytes()


def make_mnist(folder: Path, n: int = 3, gz: bool = True, seed: int = 0) -> Path:
    """Both splits of an MNIST-style dataset in ``folder`` (gzip or decompressed names)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for img, lbl in IDX.values():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, arr in ((img, images), (lbl, labels)):
            data = idx_bytes(arr)
            if gz:
                (folder / name).write_bytes(gzip.compress(data))
            else:
                (folder / name.removesuffix(".gz")).write_bytes(data)
    return folder


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


def cifar_batch(n: int, classes: int = 10, fine: bool = False, seed: int = 0,
                labels_as_list: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    batch = {b"batch_label": b"training batch 1 of 5",
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    batch[b"fine_labels" if fine else b"labels"] = labels.tolist() if labels_as_list else labels
    return batch


def make_cifar10(folder: Path, as_tar: bool = False, n: int = 2,
                 dump: Callable[[object], bytes] = lambda b: pickle.dumps(b, protocol=2),
                 override: dict[str, bytes] | None = None) -> Path:
    """CIFAR-10 in its extracted folder (``folder/cifar-10-batches-py``) or as the .tar.gz."""
    spec = dataset_spec("cifar10")
    members = {m: dump(cifar_batch(n, seed=i)) for i, m in enumerate(ds._all_members(spec))}
    members.update(override or {})
    write_cifar_members(folder, spec, members, as_tar)
    return folder


def make_svhn(path: Path, n: int) -> Path:
    rng = np.random.default_rng(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                            "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- 1. explicit location


def _missing_file(d: Path) -> Path:
    make_mnist(d / "mnist")
    (d / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    return d


def _file_is_directory(d: Path) -> Path:
    make_mnist(d / "mnist")
    (d / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    (d / "mnist" / "t10k-images-idx3-ubyte.gz").mkdir()
    return d


def _a_file(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("x")
    return d / "notes.txt"


def _below_a_file(d: Path) -> Path:
    return _a_file(d) / "mnist"


def _broken_link(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "link").symlink_to(d / "gone")
    return d / "link"


def _empty_folder(d: Path) -> Path:
    d.mkdir(parents=True)
    return d


BAD_LOCATIONS = [
    # (make the bad location under a temp folder, what the message must say)
    pytest.param(_missing_file, r"lacks train-labels-idx1-ubyte\.gz \(or uncompressed\)",
                 id="missing-one-file"),
    pytest.param(lambda d: d / "does-not-exist", r"does-not-exist does not exist", id="absent"),
    pytest.param(_a_file, r"notes\.txt is a file, not a folder", id="file-not-folder"),
    pytest.param(_below_a_file, r"does not exist \(.*notes\.txt is a file, not a folder\)",
                 id="below-a-file"),
    pytest.param(_file_is_directory, r"t10k-images-idx3-ubyte\.gz is a directory, not a file",
                 id="data-file-is-directory"),
    pytest.param(_broken_link, r"link is a broken symbolic link", id="broken-link"),
    pytest.param(_empty_folder, r"lacks train-images-idx3-ubyte\.gz \(or uncompressed\), "
                 r"train-labels.*t10k-images.*t10k-labels", id="empty-folder-lists-each"),
]


def _complete_elsewhere(isolated: Path) -> None:
    """The dataset is complete in every other place: a fallback would find it."""
    make_mnist(isolated / "no-system" / "mnist", seed=1)
    make_mnist(isolated / "no-cache" / "mnist", seed=2)


@pytest.mark.parametrize("make, expected", BAD_LOCATIONS)
def test_bad_data_dir_fails_and_never_falls_back(tmp_path, monkeypatch, make, expected):
    _complete_elsewhere(tmp_path)
    monkeypatch.setenv(ds.ENV_VAR, str(make_mnist(tmp_path / "env" / "mnist", seed=3)))
    bad = make(tmp_path / "given")
    for call in (lambda: find_dataset_dir("mnist", bad), lambda: load_dataset("mnist", "train", bad),
                 lambda: split_file_records("mnist", "test", bad)):
        with pytest.raises(DataError, match=expected) as err:
            call()
        msg = one_line(err)
        assert "data_dir" in msg and str(tmp_path / "given") in msg
        assert "env" + os.sep not in msg and "no-system" not in msg  # nothing else looked at
        assert "--data-dir" in msg  # how to fix


@pytest.mark.parametrize("make, expected", BAD_LOCATIONS)
def test_bad_env_dir_fails_and_never_falls_back(tmp_path, monkeypatch, make, expected):
    _complete_elsewhere(tmp_path)
    monkeypatch.setenv(ds.ENV_VAR, str(make(tmp_path / "env")))
    with pytest.raises(DataError, match=expected) as err:
        load_dataset("mnist", "train")
    msg = one_line(err)
    assert "$SIGPROP_DATA" in msg and "no-system" not in msg and "unset" in msg


def test_subfolder_is_reported_when_it_is_the_incomplete_one(tmp_path):
    folder = make_mnist(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        find_dataset_dir("mnist", tmp_path)
    msg = one_line(err)
    assert f"data_dir folder {folder} lacks t10k-labels-idx1-ubyte.gz" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_explicit_folder_itself_or_parent(tmp_path, gz):
    folder = make_mnist(tmp_path / "mnist", gz=gz)
    assert find_dataset_dir("mnist", tmp_path) == folder
    assert find_dataset_dir("mnist", folder) == folder
    assert find_dataset_dir("mnist", str(folder)) == folder
    assert len(load_dataset("mnist", "test", folder)[0]) == 3


def test_env_is_the_only_place_when_set(tmp_path, monkeypatch):
    _complete_elsewhere(tmp_path)
    env = make_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    assert find_dataset_dir("mnist") == env
    monkeypatch.setenv(ds.ENV_VAR, "")  # set but empty: the default places
    assert find_dataset_dir("mnist") == tmp_path / "no-system" / "mnist"


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_data_dir_is_a_config_error(value):
    for call in (find_dataset_dir, lambda n, d: load_dataset(n, "train", d),
                 lambda n, d: split_file_records(n, "train", d)):
        with pytest.raises(ConfigError, match="data_dir is empty") as err:
            call("mnist", value)
        one_line(err)


@pytest.mark.parametrize("value", ["a" * 5000, "/tmp/" + "/".join(["abcdefgh"] * 600),
                                   "/tmp/nul\0byte", "/tmp/new\nline"])
@pytest.mark.parametrize("origin", ["data_dir", "env"])
def test_unusable_paths_are_one_line(monkeypatch, value, origin):
    if origin == "env":
        if "\0" in value:
            pytest.skip("an environment variable cannot hold a NUL byte")
        monkeypatch.setenv(ds.ENV_VAR, value)
        args: tuple = ()
    else:
        args = (value,)
    for name in ("mnist", "cifar10", "svhn"):
        with pytest.raises(DataError) as err:
            load_dataset(name, "train", *args)
        msg = one_line(err)
        assert ("data_dir" if origin == "data_dir" else "$SIGPROP_DATA") in msg
        assert len(msg) < 1000  # a 5,000-character path is shortened


def test_data_list_survives_unusable_env(monkeypatch, capsys, tmp_path):
    from sigprop.cli import main

    make_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "env" / "mnist") in out and "cifar10" in out and "not found" in out
    monkeypatch.setenv(ds.ENV_VAR, "a" * 5000)
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(ds.DATASETS.names()) and all("not found" in line for line in out)


def test_cifar_partly_extracted_and_archive_directory(tmp_path):
    make_cifar10(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks cifar-10-python\.tar\.gz.*"
                       r"cifar-10-batches-py/ holds some batches but lacks data_batch_3") as err:
        load_dataset("cifar10", "test", tmp_path)
    one_line(err)
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").mkdir()
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz is a directory, not a file"):
        find_dataset_dir("cifar10", tmp_path)


def test_svhn_required_file_is_directory(tmp_path):
    make_svhn(tmp_path / "svhn" / "train_32x32.mat", 2)
    (tmp_path / "svhn" / "test_32x32.mat").mkdir()
    with pytest.raises(DataError, match=r"test_32x32\.mat is a directory, not a file") as err:
        load_dataset("svhn", "train", tmp_path)
    one_line(err)


# --------------------------------------------------------------------------- 2. provenance


def _official(monkeypatch, name: str, folder: Path) -> None:
    """Make the spec's official md5s those of the files in ``folder`` (as if real)."""
    spec = dataset_spec(name)
    files = tuple(dataclasses.replace(f, md5=md5((folder / f.name).read_bytes()))
                  if (folder / f.name).is_file() else f for f in spec.files)
    monkeypatch.setattr(ds, "dataset_spec", lambda n: dataclasses.replace(spec, files=files))


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


# --------------------------------------------------------------------------- 3. empty splits


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


# --------------------------------------------------------------------------- 4. safe unpickling


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
    for i, m in enumerate(ds._all_members(spec)):
        batch = cifar_batch(3, classes=100, fine=True, seed=i, labels_as_list=labels_as_list)
        batch[b"coarse_labels"] = [0, 1, 2]
        (folder / m).write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = load_dataset("cifar100", "train", tmp_path)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == list(
        np.asarray(cifar_batch(3, classes=100, fine=True, seed=0)[b"fine_labels"]))


# --------------------------------------------------------------------------- 5. downloads


@contextlib.contextmanager
def tcp_server(handle: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A threaded server on 127.0.0.1; ``handle(conn, stop)`` serves each connection.
    Yields the base URL; on exit every thread is told to stop, sockets close, threads join."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    workers: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            handle(conn, stop)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            t.start()
            workers.append(t)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/file.bin"
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for t in workers:
            t.join(5)


def _read_request(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.1)
    data = b""
    while b"\r\n\r\n" not in data and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accepts, reads the request, never answers."""
    _read_request(conn, stop)
    stop.wait(10)


def dripping(conn: socket.socket, stop: threading.Event) -> None:
    """Answers 200 with 1,000 bytes, one every 0.2 s."""
    _read_request(conn, stop)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        if stop.wait(0.2):
            return
        conn.sendall(b"x")


def serving(payload: bytes, cut: int | None = None):
    """Answers 200 with ``payload`` (only its first ``cut`` bytes, then closes)."""
    def handle(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn, stop)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(payload) + payload[:cut])
    return handle


def no_part_left(folder: Path) -> None:
    assert not [p for p in folder.rglob("*.part") if p.is_file()]
    assert not list(folder.rglob(".sigprop-write-check-*"))


def test_download_over_local_http(tmp_path):
    payload = os.urandom(300_000)
    with tcp_server(serving(payload)) as url:
        dest = download_file(url, tmp_path / "out" / "f.bin", md5(payload), progress=False,
                             stall_timeout=2, deadline=10)
    assert dest.read_bytes() == payload
    no_part_left(tmp_path)


def test_silent_server_stalls(tmp_path):
    with tcp_server(silent) as url:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"stalled: no data for 0\.5 s.*--stall-timeout") as err:
            download_file(url, tmp_path / "f.bin", "0" * 32, progress=False, stall_timeout=0.5)
        assert time.monotonic() - start < 3
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_silent_server_hits_a_nearer_deadline(tmp_path):
    with tcp_server(silent) as url:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"deadline of 0\.5 s.*--deadline") as err:
            download_file(url, tmp_path / "f.bin", "0" * 32, progress=False, stall_timeout=30,
                          deadline=0.5)
        assert time.monotonic() - start < 3
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_dripping_server_hits_the_deadline(tmp_path):
    with tcp_server(dripping) as url:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"did not finish within the deadline of 1 s.*"
                           r"--deadline SECONDS") as err:
            download_file(url, tmp_path / "f.bin", "0" * 32, progress=False, stall_timeout=1,
                          deadline=1)
        assert time.monotonic() - start < 3
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_connection_closed_early(tmp_path):
    payload = b"y" * 5000
    with tcp_server(serving(payload, cut=100)) as url, \
            pytest.raises(DataError, match=r"ended after 100 of 5000 bytes|downloading") as err:
        download_file(url, tmp_path / "f.bin", md5(payload), progress=False, stall_timeout=1)
    print(one_line(err))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_remote(monkeypatch):
    """fashion-mnist whose official files are ``b"file N"`` (md5s to match), served by an
    opener that records (url, timeout) and can be told to sleep per file."""
    spec = dataset_spec("fashion-mnist")
    payloads = {f.name: f"file {i}".encode() * 100 for i, f in enumerate(spec.files)}
    files = tuple(dataclasses.replace(f, md5=md5(payloads[f.name])) for f in spec.files)
    monkeypatch.setattr(ds, "dataset_spec", lambda n: dataclasses.replace(spec, files=files))
    calls: list[tuple[str, float]] = []
    state = {"sleep": 0.0}

    def opener(url: str, timeout: float):
        calls.append((url, timeout))
        time.sleep(state["sleep"])
        return io.BytesIO(payloads[url.rsplit("/", 1)[1]])

    return opener, calls, state


def test_opener_gets_the_timeout(tmp_path, fake_remote):
    opener, calls, _ = fake_remote
    download_dataset("fashion-mnist", tmp_path, False, opener=opener, stall_timeout=7)
    assert len(calls) == 4 and {t for _, t in calls} == {7.0}
    calls.clear()
    download_dataset("fashion-mnist", tmp_path / "b", False, opener=opener, stall_timeout=7,
                     deadline=3)
    assert all(0 < t <= 3 for _, t in calls)  # the deadline is nearer than the stall


def test_deadline_covers_the_whole_call(tmp_path, fake_remote):
    opener, calls, state = fake_remote
    state["sleep"] = 0.3
    with pytest.raises(DataError, match=r"deadline of 0\.5 s") as err:
        download_dataset("fashion-mnist", tmp_path, False, opener=opener, deadline=0.5)
    one_line(err)
    assert 1 <= len(calls) < 4
    folder = tmp_path / "fashion-mnist"
    assert 1 <= len(list(folder.iterdir())) < 4  # verified files stay, nothing half-written
    no_part_left(tmp_path)


BAD_SECONDS = [0, -1, 0.0, float("nan"), float("inf"), -float("inf"), "5", None, True]


@pytest.mark.parametrize("key", ["stall_timeout", "deadline"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_bad_time_limits_are_config_errors(tmp_path, fake_remote, key, value):
    opener, calls, _ = fake_remote
    with pytest.raises(ConfigError, match=rf"{key} must be a positive, finite number") as err:
        download_dataset("fashion-mnist", tmp_path / "d", False, opener=opener, **{key: value})
    one_line(err)
    with pytest.raises(ConfigError, match=key):
        download_file("http://x/y", tmp_path / "e" / "y", "0" * 32, opener=opener,
                      **{key: value})
    assert calls == [] and list(tmp_path.iterdir()) == []  # nothing touched


class _Interrupting(io.BytesIO):
    def __init__(self, exc: BaseException):
        super().__init__(b"z" * 10_000)
        self.exc, self.reads = exc, 0

    def read1(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:  # after a chunk is written to the .part
            raise self.exc
        return super().read1(100)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(143), MemoryError()])
def test_interrupted_download_leaves_no_part(tmp_path, fake_remote, exc):
    def opener(url, timeout):
        return _Interrupting(exc)

    with pytest.raises(type(exc)):
        download_file("http://x/f.bin", tmp_path / "f.bin", "0" * 32, progress=False,
                      opener=opener)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(type(exc)):
        download_dataset("fashion-mnist", tmp_path / "d", False, opener=opener)
    no_part_left(tmp_path)
    assert list((tmp_path / "d" / "fashion-mnist").iterdir()) == []


def test_interrupt_while_connecting_leaves_no_part(tmp_path):
    def opener(url, timeout):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_file("http://x/f.bin", tmp_path / "f.bin", "0" * 32, opener=opener)
    assert list(tmp_path.iterdir()) == []


def _dest_is_file(t: Path) -> Path:
    (t / "dest").write_text("x")
    return t / "dest"


def _dest_below_file(t: Path) -> Path:
    return _dest_is_file(t) / "sub" / "dir"


def _target_is_directory(t: Path) -> Path:
    (t / "dest" / "fashion-mnist" / "train-images-idx3-ubyte.gz").mkdir(parents=True)
    return t / "dest"


def _part_is_directory(t: Path) -> Path:
    (t / "dest" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz.part").mkdir(parents=True)
    return t / "dest"


BAD_DESTS = [
    pytest.param(_dest_is_file, r"dest is a file, not a folder", id="dest-is-file"),
    pytest.param(_dest_below_file, r"does not exist \(.*dest is a file, not a folder\)",
                 id="below-a-file"),
    pytest.param(_target_is_directory, r"train-images-idx3-ubyte\.gz is a directory, not a file",
                 id="target-is-directory"),
    pytest.param(_part_is_directory, r"\.part is a directory, not a file", id="part-is-directory"),
    pytest.param(lambda t: t / ("a" * 5000), r"cannot be used \(File name too long\)",
                 id="name-too-long"),
]


@pytest.mark.parametrize("make, expected", BAD_DESTS)
def test_bad_dest_fails_before_the_network(tmp_path, fake_remote, make, expected):
    opener, calls, _ = fake_remote
    dest = make(tmp_path)
    with pytest.raises(DataError, match=expected) as err:
        download_dataset("fashion-mnist", dest, False, opener=opener)
    assert "--dest" in one_line(err)
    assert calls == []
    no_part_left(tmp_path)


def test_download_file_bad_dest_before_the_network(tmp_path):
    calls = []

    def opener(url, timeout):
        calls.append(url)
        return io.BytesIO(b"")

    _dest_is_file(tmp_path)
    with pytest.raises(DataError, match="is a file, not a folder") as err:
        download_file("http://x/y", tmp_path / "dest" / "y", "0" * 32, opener=opener)
    one_line(err)
    assert calls == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores permission bits (below-a-file covers unwritable)")
def test_unwritable_dest(tmp_path, fake_remote):
    opener, calls, _ = fake_remote
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataError, match="not writable|cannot be created") as err:
            download_dataset("fashion-mnist", locked, False, opener=opener)
        one_line(err)
    finally:
        locked.chmod(0o700)
    assert calls == []


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_dest_is_a_config_error(fake_remote, value):
    opener, calls, _ = fake_remote
    with pytest.raises(ConfigError, match="dest_dir is empty"):
        download_dataset("fashion-mnist", value, False, opener=opener)
    assert calls == []


def test_download_creates_dest_and_loads(tmp_path, fake_remote):
    opener, calls, _ = fake_remote
    folder = download_dataset("fashion-mnist", tmp_path / "new" / "deep", False, opener=opener)
    assert folder == tmp_path / "new" / "deep" / "fashion-mnist" and len(calls) == 4
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f.name for f in dataset_spec("fashion-mnist").files)
    download_dataset("fashion-mnist", folder, False, opener=opener)
    assert len(calls) == 4  # verified files are skipped


# --------------------------------------------------------------------------- first cases
# The first regression cases written for issue 8, on the conftest fake Fashion-MNIST.


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """A complete dataset in the system root, so any fallback to it would be visible."""
    monkeypatch.setattr(ds, "SYSTEM_ROOT", tmp_path / "system")
    monkeypatch.setattr(ds, "CACHE_ROOT", tmp_path / "cache")
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    return write_fake_fashion(tmp_path / "system")


# --------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("origin", ["data_dir", "env"])
def test_explicit_location_never_falls_back(roots, tmp_path, monkeypatch, origin):
    given = tmp_path / "given"
    given.mkdir()
    (given / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    if origin == "env":
        monkeypatch.setenv(ds.ENV_VAR, str(given))
    with pytest.raises(DataError) as err:
        find_dataset_dir("fashion-mnist", given if origin == "data_dir" else None)
    msg = str(err.value)
    assert str(given) in msg and "train-labels-idx1-ubyte" in msg
    assert ("SIGPROP_DATA" in msg) == (origin == "env")
    assert str(roots) not in msg  # the complete system copy was not used
    assert find_dataset_dir("fashion-mnist", roots) == roots  # an explicit good one is


def test_default_chain_when_nothing_given(roots):
    assert find_dataset_dir("fashion-mnist") == roots


def test_unprobeable_paths_are_one_line(roots, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, "d" * 5000)
    with pytest.raises(DataError, match="SIGPROP_DATA"):
        find_dataset_dir("fashion-mnist")
    monkeypatch.delenv(ds.ENV_VAR)
    with pytest.raises(SigpropErrors):
        find_dataset_dir("fashion-mnist", "bad\0path")
    with pytest.raises(ConfigError, match="empty"):
        find_dataset_dir("fashion-mnist", "")


SigpropErrors = (DataError, ConfigError)


# --------------------------------------------------------------------------- provenance


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


def test_empty_split_is_refused_at_load(roots):
    (roots / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(_idx(np.zeros((0, 28, 28), np.uint8), 0x803)))
    (roots / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx(np.zeros(0, np.uint8), 0x801)))
    with pytest.raises(DataError, match="no images"):
        load_dataset("fashion-mnist", "test", roots)


# --------------------------------------------------------------------------- CIFAR pickles


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


# --------------------------------------------------------------------------- downloads


class _Server:
    """A local TCP server on 127.0.0.1 that ``behave(conn)`` answers; bounded, closed at
    the end of the test."""

    def __init__(self, behave) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.stop = threading.Event()
        self.behave = behave
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/file.gz"

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            self.behave(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=10)


def _never_answers(conn, stop) -> None:
    stop.wait(10)


def _drips(conn, stop) -> None:
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(100):  # one byte every 0.2 s: never a stall, never the end
        if stop.wait(0.2):
            return
        try:
            conn.sendall(b"x")
        except OSError:
            return


@pytest.mark.parametrize("behave,limit,match", [
    (_never_answers, "stall", "stalled: no data for 1 s"),
    (_drips, "deadline", "deadline of 1 s"),
])
def test_download_ends_within_its_limits(tmp_path, behave, limit, match):
    server = _Server(behave)
    try:
        t0 = time.monotonic()
        kw = {"stall_timeout": 1.0, "deadline": 60.0} if limit == "stall" else \
            {"stall_timeout": 5.0, "deadline": 1.0}
        with pytest.raises(DataError, match=match):
            ds.download_file(server.url, tmp_path / "file.gz", "0" * 32, progress=False,
                             opener=ds._default_opener, **kw)
        assert time.monotonic() - t0 < 8
    finally:
        server.close()
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "file.gz").exists()


class _Breaks:
    """A response whose second read raises ``exc`` (Ctrl-C, or SIGTERM as SystemExit)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.reads, self.headers = exc, 0, {}

    def read1(self, n: int) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise self.exc
        return b"partial"

    def __enter__(self):
        return self

    def __exit__(self, *a) -> None:
        pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(143)])
def test_interrupted_read1_only_response_leaves_no_part(tmp_path, exc):
    with pytest.raises(type(exc)):
        ds.download_file("http://127.0.0.1:9/x", tmp_path / "x.gz", "0" * 32, progress=False,
                         opener=lambda url, timeout: _Breaks(exc))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "30", True])
@pytest.mark.parametrize("key", ["stall_timeout", "deadline"])
def test_download_limits_must_be_positive_seconds(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        ds.download_file("http://127.0.0.1:9/x", tmp_path / "x", "0" * 32, **{key: value})


def test_download_dest_checked_before_the_network(tmp_path):
    (tmp_path / "f").write_text("x")
    calls = []
    for dest in (tmp_path / "f", tmp_path / "f" / "below"):
        with pytest.raises(DataError):
            ds.download_dataset("mnist", dest, progress=False,
                                opener=lambda url, timeout: calls.append(url))
    assert calls == []
