"""Readers for the on-disk formats the datasets ship in: IDX, CIFAR pickles, SVHN .mat.

Every reader is a pure function returning ``(images uint8 (N, C, H, W), labels int64 (N,))``
and turns any unreadable, truncated or malformed file into a :class:`DataError` that
names the file and says how to fix it, on one line (:func:`shown` escapes odd paths).

Files read here are never trusted to run code: CIFAR pickles go through a restricted
unpickler (:class:`CifarUnpickler`) that builds only numpy arrays and plain containers
and refuses any other global a pickle names, instead of calling it. Nor to be the size they
claim: an IDX file's size is checked against its header before its data is read, a .gz is
decompressed in bounded pieces that stop just past that size (a 40 GB file or a gzip bomb is
one line, not an out-of-memory), and labels must be whole numbers in range, never cast (2.5
is not read as 2). The ``check_*`` functions do the cheap part - headers, sizes, magic bytes
- without loading, for checks before work starts.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import tarfile
import warnings
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
_MAX_CLASS = (1 << 31) - 1  # labels above this are damage, whatever the dataset


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

# An IDX header claiming more is damaged: 20x the largest IDX file a dataset here ships
# (Fashion-MNIST's train images, 47 MB), and above EMNIST's largest (0.55 GB).
IDX_MAX_BYTES = 1 << 30
_CHUNK = 1 << 20  # compressed bytes per read: memory stays bounded whatever a file holds
_SLACK = 1 << 20  # bytes read past the header's size, to say how much more a file holds


class _Gunzip:
    """The decompressed bytes of an open gzip file, on demand and in bounded pieces, so a
    file that decompresses to far more than it should (a gzip bomb) is never held whole.
    Concatenated members read as one stream, as ``gunzip`` reads them."""

    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper: CRC and size checked

    def _more(self) -> bytes:
        try:
            return self.f.read(_CHUNK)
        except OSError as e:
            raise corrupt(self.path, f"cannot read ({os_reason(e)})") from None

    def _next_member(self) -> bytes:
        """The input that starts the next member, or b"" at the clean end of the file."""
        rest = self.d.unused_data
        while len(rest) < 2 and (more := self._more()):
            rest += more
        if rest and rest[:2] != _GZIP_MAGIC:
            raise corrupt(self.path, "cannot decompress (data after the end of the gzip "
                                     "stream)")
        if rest:  # at the end, stay ended: a later call finds the end again
            self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return rest

    def parts(self, n: int) -> list[bytes]:
        """Up to ``n`` more decompressed bytes, as pieces; fewer only at the end."""
        parts, got = [], 0
        while got < n:
            if self.d.eof:
                data = self._next_member()
                if not data:
                    break
            else:
                data = self.d.unconsumed_tail or self._more()
                if not data:
                    raise corrupt(self.path, "cannot decompress (the compressed data ends "
                                             "early)")
            try:
                block = self.d.decompress(data, n - got)
            except zlib.error as e:
                raise corrupt(self.path, f"cannot decompress ({e})") from None
            if block:
                parts.append(block)
                got += len(block)
        return parts

    def read(self, n: int) -> bytes:
        return b"".join(self.parts(n))

    def count(self, limit: int) -> int:
        """How many bytes are left, counting no further than ``limit``; nothing is kept."""
        got = 0
        while got < limit and (piece := self.parts(min(_CHUNK, limit - got))):
            got += sum(map(len, piece))
        return got


def _idx_header(path: Path, head: bytes, read: Callable[[int], bytes], ndim: int,
                max_bytes: int) -> tuple[int, tuple[int, ...]]:
    """(header length, dims) from the first bytes ``head`` (and ``read`` for the rest of the
    header), strictly checked; dims claiming over ``max_bytes`` of data mean damage."""
    if len(head) < 4:
        raise corrupt(path, f"only {len(head)} bytes, too short for an IDX header")
    if head[:2] != b"\x00\x00":
        raise corrupt(path, f"not an IDX file (bad magic number 0x{head[:4].hex()})")
    if head[2] != _IDX_UBYTE:
        raise corrupt(path, f"IDX element type 0x{head[2]:02x}, expected 0x08 (unsigned byte)")
    if head[3] != ndim:
        raise corrupt(path, f"IDX file has {head[3]} dimensions, expected {ndim}")
    length = 4 + 4 * ndim
    rest = read(length - 4)
    if len(rest) < length - 4:
        raise corrupt(path, "IDX header ends early")
    dims = struct.unpack(f">{ndim}I", rest)
    if math.prod(dims) > max_bytes:
        raise corrupt(path, f"header {dims} claims {math.prod(dims)} bytes of data, more than "
                            f"an IDX file of a dataset holds ({max_bytes} at most)")
    return length, dims


def _size_error(path: Path, dims: tuple[int, ...], expected: int, found: int | str) -> Exception:
    return corrupt(path, f"header {dims} needs {expected} bytes but the file has {found}")


def _gzip_size_hint(f: BinaryIO) -> int | None:
    """The uncompressed size mod 2**32 a gzip file's trailer records (of its last member)."""
    try:
        f.seek(-4, io.SEEK_END)
        tail = f.read(4)
    except OSError:
        return None
    return struct.unpack("<I", tail)[0] if len(tail) == 4 else None


def _scan_raw(f: BinaryIO, path: Path, head: bytes, ndim: int, max_bytes: int,
              load: bool) -> tuple[tuple[int, ...], np.ndarray | None]:
    """:func:`_scan_idx` of an uncompressed file: its size is known before any data is read."""
    try:
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise corrupt(path, f"cannot read ({os_reason(e)})") from None
    if size > max_bytes + 4 + 4 * ndim:
        raise corrupt(path, f"{size} bytes, more than an IDX file of a dataset holds "
                            f"({max_bytes} at most)")
    length, dims = _idx_header(path, head, f.read, ndim, max_bytes)
    expected = length + math.prod(dims)
    if size != expected:
        raise _size_error(path, dims, expected, size)
    if not load:
        return dims, None
    data = np.empty(expected - length, np.uint8)
    try:
        got = f.readinto(memoryview(data))
    except OSError as e:
        raise corrupt(path, f"cannot read ({os_reason(e)})") from None
    if got != len(data):  # it shrank while read
        raise _size_error(path, dims, expected, length + got)
    return dims, data.reshape(dims)


def _scan_gzip(f: BinaryIO, path: Path, ndim: int, max_bytes: int,
               load: bool) -> tuple[tuple[int, ...], np.ndarray | None]:
    """:func:`_scan_idx` of a .gz: decompressed in bounded pieces, up to just past the size
    the header gives; the array is allocated only once that size is found to be right."""
    hint = None if load else _gzip_size_hint(f)
    try:
        f.seek(0)
    except OSError as e:
        raise corrupt(path, f"cannot read ({os_reason(e)})") from None
    gz = _Gunzip(f, path)
    length, dims = _idx_header(path, gz.read(4), gz.read, ndim, max_bytes)
    payload = math.prod(dims)
    expected = length + payload
    if not load and hint == expected % (1 << 32):
        return dims, None
    parts = gz.parts(payload + _SLACK) if load else []
    found = length + (sum(map(len, parts)) if load else gz.count(payload + _SLACK))
    if found != expected:
        raise _size_error(path, dims, expected, found if found < expected else
                          f"at least {found} (reading stopped there)")
    if not load:
        return dims, None
    data = np.empty(payload, np.uint8)
    at = 0
    for piece in parts:
        data[at:at + len(piece)] = np.frombuffer(piece, np.uint8)
        at += len(piece)
    return dims, data.reshape(dims)


def _scan_idx(path: Path, ndim: int, max_bytes: int,
              load: bool) -> tuple[tuple[int, ...], np.ndarray | None]:
    """(dims, data if ``load`` else None): the header checked, then the file's size against
    it, reading no more than the header's size (+ ``_SLACK``, to say how much more a file
    holds). Without ``load`` a raw file is only stat-ed, and a .gz is decompressed through
    only when its trailer's size disagrees with the header (it may hold several members)."""
    with open_for_reading(path) as f:
        try:
            head = f.read(4)
        except OSError as e:
            raise corrupt(path, f"cannot read ({os_reason(e)})") from None
        # Sniff the gzip magic rather than trust the extension: people gunzip files
        # and keep the name, or rename them.
        if head[:2] == _GZIP_MAGIC:
            return _scan_gzip(f, path, ndim, max_bytes, load)
        return _scan_raw(f, path, head, ndim, max_bytes, load)


def read_idx(path: Path | str, ndim: int, max_bytes: int = IDX_MAX_BYTES) -> np.ndarray:
    """An unsigned-byte IDX file (raw or .gz) as a writable array with ``ndim`` dimensions,
    strictly checked: its size must be what the header says, and is checked before the data
    is read (a .gz is decompressed in bounded pieces and stops just past that size); a header
    claiming more than ``max_bytes`` of data is a damaged file."""
    _, data = _scan_idx(Path(path), ndim, max_bytes, load=True)
    assert data is not None
    return data


def check_idx(path: Path | str, ndim: int, max_bytes: int = IDX_MAX_BYTES) -> tuple[int, ...]:
    """The dims of an IDX file after :func:`read_idx`'s header and size checks, without
    reading its data: a raw file is only stat-ed; a .gz whose trailer records the header's
    size is not decompressed past the header (its CRC is checked only when loaded)."""
    return _scan_idx(Path(path), ndim, max_bytes, load=False)[0]


def load_idx(images_path: Path | str, labels_path: Path | str) -> Batch:
    """An MNIST-style image/label file pair as ``(N, 1, H, W)`` uint8 and ``(N,)`` int64."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise corrupt(
            labels_path, f"{len(labels)} labels for {len(images)} images in {images_path}"
        )
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- headers


def _first_bytes(path: Path, n: int) -> bytes:
    with open_for_reading(path) as f:
        try:
            return f.read(n)
        except OSError as e:
            raise corrupt(path, f"cannot read ({os_reason(e)})") from None


def check_gzip_start(path: Path | str) -> None:
    """``path`` starts as a gzip file does (a CIFAR .tar.gz), without decompressing it."""
    head = _first_bytes(Path(path), 2)
    if head != _GZIP_MAGIC:
        raise corrupt(path, "empty" if not head else f"not a gzip file (starts 0x{head.hex()})")


def check_pickle_start(path: Path | str) -> None:
    """``path`` starts as a pickled dict does (a CIFAR batch), without unpickling it: the
    protocol opcode (2 and up), MARK (0) or EMPTY_DICT (1)."""
    head = _first_bytes(Path(path), 1)
    if head not in (b"\x80", b"(", b"}"):
        raise corrupt(path, "empty" if not head else f"not a pickle (starts 0x{head.hex()})")


def check_mat_start(path: Path | str) -> None:
    """``path`` has the header of a MATLAB file scipy reads (v4 or v5; v7.3 is HDF5)."""
    import scipy.io

    path = Path(path)
    with open_for_reading(path) as f:
        try:
            major, _ = scipy.io.matlab.matfile_version(f)
        except Exception as e:  # noqa: BLE001 - MatReadError, ValueError, OSError
            raise corrupt(path, f"not a MATLAB file ({type(e).__name__}: {e})") from None
    if major not in (0, 1):
        raise corrupt(path, "a MATLAB v7.3 (HDF5) file, which scipy cannot read; the SVHN "
                            "files are v5")


# --------------------------------------------------------------------------- labels


def whole_labels(values: np.ndarray, source: Path | str, low: int, high: int) -> np.ndarray:
    """``values`` as int64 when each is a whole number in ``low..high``; else the
    CorruptFileError naming ``source`` and the first bad value. Checked before the cast,
    which would truncate 2.5 to 2 and turn NaN or text into a warning or a traceback."""
    kind = values.dtype.kind
    if kind not in "iuf" or values.dtype.fields is not None:
        first = values.flat[0] if values.size else ""
        first = shown(repr(first.item() if isinstance(first, np.generic) else first))
        what = {"U": "text", "S": "bytes", "b": "booleans", "O": "Python objects",
                "c": "complex numbers"}.get(kind, str(values.dtype))
        raise corrupt(source, f"labels are {what} (first {first}), expected whole numbers")
    flat = values.reshape(-1)
    if kind == "f":
        with np.errstate(all="ignore"):
            bad = ~np.isfinite(flat) | (np.floor(flat) != flat)
        if bad.any():
            i = int(np.argmax(bad))
            raise corrupt(source, f"label {flat[i].item()!r} (at position {i}) is not a whole "
                                  "number")
    if flat.size:
        lo, hi = flat.min().item(), flat.max().item()
        if lo < low or hi > high:
            raise corrupt(source, f"labels span {lo:g}..{hi:g}, expected {low}..{high}")
    return flat.astype(np.int64).reshape(values.shape)


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
        labels = np.asarray(batch[key])
    except (TypeError, ValueError, OverflowError) as e:  # ragged lists
        raise corrupt(source, f"data or labels are not arrays ({e})") from None
    if data.size == 0 and labels.size == 0:
        data = np.empty((0, 3 * 32 * 32), np.uint8)  # no rows: load_dataset names the file
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(source, f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1:
        raise corrupt(source, f"labels have shape {labels.shape}, expected ({len(data)},)")
    if labels.shape != (len(data),):
        raise corrupt(source, f"{labels.size} labels for {len(data)} images")
    # the class range is the dataset's (load_dataset); here: whole numbers that fit
    return data, whole_labels(labels, source, 0, _MAX_CLASS)


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
        with f, warnings.catch_warnings():
            # what scipy only warns about in a damaged file (a variable it cannot read)
            warnings.simplefilter("error", scipy.io.matlab.MatReadWarning)
            warnings.simplefilter("error", RuntimeWarning)
            mat = scipy.io.loadmat(f, variable_names=("X", "y"))
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError, MatReadError, OSError
        raise corrupt(path, f"cannot read the .mat file ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat:
        raise corrupt(path, "missing variable X or y")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise corrupt(path, f"X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    n = x.shape[3]
    if y.size != n or y.ndim > 2 or (y.ndim == 2 and 1 not in y.shape):
        raise corrupt(path, f"y has shape {y.shape}, expected ({n}, 1)")
    labels = whole_labels(y.reshape(n), path, 0, 10)  # 1..10; 0 read as the digit 0 too
    # (H, W, C, N) -> (N, C, H, W)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return torch.from_numpy(images), torch.from_numpy(labels % 10)
