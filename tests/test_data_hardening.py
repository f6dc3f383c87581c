"""Data under hostile conditions: explicit locations never fall back, provenance records
what was read, empty splits and code-carrying pickles are refused, and downloads end
within their stall timeout and deadline without leaving a partial file."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import _idx, write_fake_fashion

import sigprop.data.datasets as ds
from sigprop.data import find_dataset_dir, load_cifar, load_dataset, split_file_records
from sigprop.errors import ConfigError, DataError


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
def test_interrupted_download_leaves_no_part(tmp_path, exc):
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
