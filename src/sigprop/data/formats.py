"""Readers for the on-disk formats the datasets ship in: IDX, CIFAR pickles, SVHN .mat.

Every reader is a pure function returning ``(images uint8 (N, C, H, W), labels int64 (N,))``
and turns any unreadable, truncated or malformed file into a :class:`DataError` that
names the file and says how to fix it.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
CORRUPT_FIX = "delete it and download it again"


class CorruptFileError(DataError):
    """A data file exists but is truncated, damaged or not in the expected format."""


def corrupt(path: Path | str, problem: str) -> CorruptFileError:
    """The one error for a file that exists but cannot be used."""
    return CorruptFileError(f"{path}: {problem}; the file is truncated or corrupt - {CORRUPT_FIX}")


def idx_path(folder: Path, gz_name: str) -> Path:
    """The IDX file as stored: ``name.gz`` if present, else the decompressed ``name``."""
    gz = folder / gz_name
    raw = folder / gz_name.removesuffix(".gz")
    return gz if gz.is_file() or not raw.is_file() else raw


# --------------------------------------------------------------------------- IDX


def _read_maybe_gzip(path: Path) -> bytes:
    # Sniff the gzip magic rather than trust the extension: people gunzip files
    # and keep the name, or rename them.
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != _GZIP_MAGIC:
                return f.read()
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                return g.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise corrupt(path, f"cannot decompress ({e})") from None


def read_idx(path: Path | str, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file as an array with ``ndim`` dimensions, strictly checked."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise corrupt(path, f"only {len(data)} bytes, too short for an IDX header")
    if data[:2] != b"\x00\x00":
        raise corrupt(path, f"not an IDX file (bad magic number 0x{data[:4].hex()})")
    if data[2] != _IDX_UBYTE:
        raise corrupt(path, f"IDX element type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    if data[3] != ndim:
        raise corrupt(path, f"IDX file has {data[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise corrupt(path, "IDX header ends early")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise corrupt(path, f"header {dims} needs {expected} bytes but the file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(images_path: Path | str, labels_path: Path | str) -> Batch:
    """An MNIST-style image/label file pair as ``(N, 1, H, W)`` uint8 and ``(N,)`` int64."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise corrupt(
            labels_path, f"{len(labels)} labels for {len(images)} images in {images_path}"
        )
    # np.frombuffer views read-only bytes; copy so torch gets a writable tensor.
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- CIFAR


def _decode_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # encoding="bytes": the batches were pickled by Python 2, so keys are bytes.
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # a damaged pickle can raise almost anything
        raise corrupt(source, f"cannot unpickle ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict) or b"data" not in batch:
        raise corrupt(source, "not a CIFAR batch (no b'data' key)")
    # CIFAR-100 carries both coarse (20) and fine (100) labels; the benchmark uses fine.
    key = b"fine_labels" if b"fine_labels" in batch else b"labels"
    if key not in batch:
        raise corrupt(source, "not a CIFAR batch (no b'labels' or b'fine_labels' key)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(source, f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise corrupt(source, f"{labels.size} labels for {len(data)} images")
    return data, labels


def _cifar_raw_members(archive: Path, members: Sequence[str]) -> dict[str, bytes]:
    # One sequential pass: seeking back in a .tar.gz means decompressing again.
    wanted = set(members)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None  # isfile() guarantees a file object
                    found[info.name] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise corrupt(archive, f"cannot read the archive ({e})") from None
    missing = wanted - found.keys()
    if missing:
        raise corrupt(archive, f"archive lacks {', '.join(sorted(missing))}")
    return found


def load_cifar(source: Path | str, members: Sequence[str], archive_folder: str = "") -> Batch:
    """CIFAR-10/100 batches from a folder of pickles or from the ``.tar.gz`` as downloaded.

    ``source`` is either the extracted folder (``cifar-10-batches-py``) or the archive, whose
    members are ``archive_folder/<member>``.
    """
    source = Path(source)
    parts = []
    if source.is_dir():
        for m in members:
            path = source / m
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raise DataError(f"{path}: file not found") from None
            except OSError as e:
                raise corrupt(path, f"cannot read ({e})") from None
            parts.append(_decode_cifar_batch(raw, str(path)))
    else:
        names = [f"{archive_folder}/{m}" if archive_folder else m for m in members]
        raws = _cifar_raw_members(source, names)
        parts = [_decode_cifar_batch(raws[n], f"{source}:{n}") for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # Rows are stored channel-major (1024 R, 1024 G, 1024 B), i.e. already CHW.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


# --------------------------------------------------------------------------- SVHN


def load_svhn_mat(path: Path | str) -> Batch:
    """One SVHN ``*_32x32.mat`` file; label 10 (the digit 0) becomes 0."""
    import scipy.io  # imported here: scipy is slow to import and only SVHN needs it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except Exception as e:  # scipy raises ValueError, MatReadError, OSError, ...
        raise corrupt(path, f"cannot read the .mat file ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat:
        raise corrupt(path, "missing variable X or y")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise corrupt(path, f"X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    n = x.shape[3]
    if y.size != n or y.ndim > 2:
        raise corrupt(path, f"y has shape {y.shape}, expected ({n}, 1)")
    labels = y.reshape(n).astype(np.int64)
    if n and (labels.min() < 0 or labels.max() > 10):
        raise corrupt(path, f"labels span {labels.min()}..{labels.max()}, expected 1..10")
    # (H, W, C, N) -> (N, C, H, W)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(images), torch.from_numpy(labels % 10)
