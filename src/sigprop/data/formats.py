"""Readers for the on-disk formats the datasets ship in: IDX, CIFAR pickles, SVHN .mat.

Every reader is a pure function returning ``(images uint8 (N, C, H, W), labels int64 (N,))``
and turns any unreadable, truncated or malformed file into a :class:`DataError` that
names the file and says how to fix it, on one line (:func:`shown` escapes odd paths).

Files read here are never trusted to run code: CIFAR pickles go through a restricted
unpickler (:class:`CifarUnpickler`) that builds only numpy arrays and plain containers
and refuses any other global a pickle names, instead of calling it.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import torch

from ..errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
CORRUPT_FIX = "delete it and download it again"


_MAX_SHOWN = 240  # longer paths are shortened in messages (a 5,000-character $SIGPROP_DATA)


class CorruptFileError(DataError):
    """A data file exists but is truncated, damaged or not in the expected format."""


def shown(text: object) -> str:
    """``text`` (a path, a name from a file) fit for a one-line message: escaped if it holds
    a newline or other unprintable character or surrounding blanks, shortened if very long."""
    s = str(text)
    if not s.isprintable() or s != s.strip():
        s = repr(s)
    if len(s) > _MAX_SHOWN:
        s = f"{s[:160]}...{s[-60:]} ({len(s)} characters)"
    return s


def corrupt(path: Path | str, problem: str) -> CorruptFileError:
    """The one error for a file that exists but cannot be used."""
    return CorruptFileError(
        f"{shown(path)}: {shown(problem)}; the file is truncated or corrupt - {CORRUPT_FIX}"
    )


def os_reason(err: BaseException) -> str:
    """The short cause of an OSError (``File name too long``), else the exception text."""
    return shown(getattr(err, "strerror", None) or err)


def open_for_reading(path: Path) -> BinaryIO:
    """``path`` opened for reading; a missing, unreadable or non-regular file (a directory,
    a path the system cannot even look up) is a one-line DataError naming it."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{shown(path)}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{shown(path)}: is a directory, not a file; put the file there "
                        "instead") from None
    except PermissionError as e:
        raise DataError(f"{shown(path)}: cannot read ({os_reason(e)}); make it readable") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise DataError(f"{shown(path)}: cannot open ({os_reason(e)}); check the path") from None


def read_file_bytes(path: Path) -> bytes:
    """All of ``path``, with :func:`open_for_reading`'s errors; a read that fails midway
    (an I/O error) means the file is damaged."""
    with open_for_reading(path) as f:
        try:
            return f.read()
        except OSError as e:
            raise corrupt(path, f"cannot read ({os_reason(e)})") from None


def is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder; a path that cannot be looked up is a DataError."""
    try:
        return path.is_dir()
    except (OSError, ValueError) as e:
        raise DataError(f"{shown(path)}: cannot be checked ({os_reason(e)}); check the "
                        "path") from None


def idx_path(folder: Path, gz_name: str) -> Path:
    """The IDX file as stored: ``name.gz`` if present, else the decompressed ``name``."""
    gz = folder / gz_name
    raw = folder / gz_name.removesuffix(".gz")
    return gz if gz.is_file() or not raw.is_file() else raw


# --------------------------------------------------------------------------- IDX


def _read_maybe_gzip(path: Path) -> bytes:
    # Sniff the gzip magic rather than trust the extension: people gunzip files
    # and keep the name, or rename them.
    raw = read_file_bytes(path)
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
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


def _numpy_reconstruct():
    """numpy's array-unpickling helper, from where this numpy keeps it (2.x: ``numpy._core``),
    without importing the deprecated ``numpy.core`` alias."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: object, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles written by Python 3 use it for every bytes
    object (``encode(str, 'latin1')``); any other use is refused."""
    if encoding != "latin1" or errors != "strict" or not isinstance(text, str):
        raise RefusedGlobal("_codecs.encode", f"with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()`` as protocol-2 pickles written by Python 3 spell ``b""`` (the data of an
    empty array); a call with arguments (``bytes(10**12)``) is refused."""
    if args:
        raise RefusedGlobal("builtins.bytes", "with arguments")
    return b""


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global that a CIFAR batch never holds; it was not called."""

    def __init__(self, name: str, detail: str = ""):
        super().__init__(name)
        self.name, self.detail = name, detail


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold: dicts, lists, strings, numbers and numpy
    arrays. Every other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`RefusedGlobal` instead of being looked up, so a file cannot run code."""

    # Python 2 pickles (the official files) name numpy.core; numpy 2 writes numpy._core.
    ALLOWED: ClassVar[dict[tuple[str, str], Callable[[], object]]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        # Python 3 writes bytes in protocol 2 as these two calls; both are narrowed.
        ("_codecs", "encode"): lambda: _latin1_encode,
        ("__builtin__", "bytes"): lambda: _empty_bytes,
        ("builtins", "bytes"): lambda: _empty_bytes,
    }

    def find_class(self, module: str, name: str):
        get = self.ALLOWED.get((module, name))
        if get is None:
            raise RefusedGlobal(f"{module}.{name}")
        return get()


def _unpickle_cifar(raw: bytes, source: str) -> object:
    try:
        # encoding="bytes": the batches were pickled by Python 2, so keys are bytes.
        return CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedGlobal as e:
        what = f"{e.name} {e.detail}".strip()
        raise CorruptFileError(
            f"{shown(source)}: contains objects a CIFAR batch never holds ({shown(what)}) and "
            f"was refused, not run; the file is not a genuine CIFAR batch - {CORRUPT_FIX}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise almost anything
        raise corrupt(source, f"cannot unpickle ({type(e).__name__}: {e})") from None


def _decode_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle_cifar(raw, source)
    if not isinstance(batch, dict) or b"data" not in batch:
        raise corrupt(source, "not a CIFAR batch (no b'data' key)")
    # CIFAR-100 carries both coarse (20) and fine (100) labels; the benchmark uses fine.
    key = b"fine_labels" if b"fine_labels" in batch else b"labels"
    if key not in batch:
        raise corrupt(source, "not a CIFAR batch (no b'labels' or b'fine_labels' key)")
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:  # ragged lists, non-numbers
        raise corrupt(source, f"data or labels are not arrays ({e})") from None
    if data.size == 0 and labels.size == 0:
        data = np.empty((0, 3 * 32 * 32), np.uint8)  # no rows: load_dataset names the file
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(source, f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1:
        raise corrupt(source, f"labels have shape {labels.shape}, expected ({len(data)},)")
    if labels.shape != (len(data),):
        raise corrupt(source, f"{labels.size} labels for {len(data)} images")
    return data, labels


def _cifar_raw_members(archive: Path, members: Sequence[str]) -> dict[str, bytes]:
    # One sequential pass: seeking back in a .tar.gz means decompressing again.
    # Members are read into memory, never extracted: no path in the archive is used.
    wanted = set(members)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None  # isfile() guarantees a file object
                    found[info.name] = f.read()
    except PermissionError as e:
        raise DataError(f"{shown(archive)}: cannot read ({os_reason(e)}); make it "
                        "readable") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise corrupt(archive, f"cannot read the archive ({e})") from None
    missing = wanted - found.keys()
    if missing:
        raise corrupt(archive, f"archive lacks {', '.join(sorted(missing))}")
    return found


CifarPart = tuple[str, np.ndarray, np.ndarray]  # (where it came from, data (N, 3072), labels)


def read_cifar_batches(source: Path | str, members: Sequence[str],
                       archive_folder: str = "") -> list[CifarPart]:
    """Each CIFAR batch ``members`` names, decoded, with the file (or ``archive:member``)
    it came from, so callers can name the one batch that is wrong."""
    source = Path(source)
    if is_folder(source):
        return [(str(source / m), *_decode_cifar_batch(read_file_bytes(source / m),
                                                       str(source / m))) for m in members]
    names = [f"{archive_folder}/{m}" if archive_folder else m for m in members]
    raws = _cifar_raw_members(source, names)
    return [(f"{source}:{n}", *_decode_cifar_batch(raws[n], f"{source}:{n}")) for n in names]


def cifar_tensors(parts: Sequence[CifarPart]) -> Batch:
    """Batches from :func:`read_cifar_batches` joined as ``(N, 3, 32, 32)`` and ``(N,)``."""
    data = np.concatenate([p[1] for p in parts])
    labels = np.concatenate([p[2] for p in parts])
    # Rows are stored channel-major (1024 R, 1024 G, 1024 B), i.e. already CHW.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def load_cifar(source: Path | str, members: Sequence[str], archive_folder: str = "") -> Batch:
    """CIFAR-10/100 batches from a folder of pickles or from the ``.tar.gz`` as downloaded.

    ``source`` is either the extracted folder (``cifar-10-batches-py``) or the archive, whose
    members are ``archive_folder/<member>``.
    """
    return cifar_tensors(read_cifar_batches(source, members, archive_folder))


# --------------------------------------------------------------------------- SVHN


def load_svhn_mat(path: Path | str) -> Batch:
    """One SVHN ``*_32x32.mat`` file; label 10 (the digit 0) becomes 0."""
    import scipy.io  # imported here: scipy is slow to import and only SVHN needs it

    path = Path(path)
    f = open_for_reading(path)  # missing / unreadable / a directory: one clear line
    try:
        with f:
            mat = scipy.io.loadmat(f, variable_names=("X", "y"))
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError, MatReadError, OSError
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
