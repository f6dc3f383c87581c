"""Dataset specs, where their files live, and how to load, download and check them.

Where dataset ``NAME`` is read from - the first rule that applies decides, and nothing
falls back to another place, so a run never trains on other data than it was pointed at:

1. an explicit ``data_dir``: only that folder, or its ``NAME/`` subfolder;
2. else a non-empty ``$SIGPROP_DATA``: only that folder, or its ``NAME/`` subfolder;
3. else the default places, the first complete one wins: ``/usr/share/datasets/NAME``, then
   the user cache (``$XDG_CACHE_HOME/sigprop/NAME`` or ``~/.cache/sigprop/NAME``).

When the folder of rule 1 or 2 is unusable, one DataError line names the origin, the
folder and exactly what is wrong there (does not exist, is a file, lacks file X, X is a
directory), and how to fix it. Every probe of a user-given path is guarded: a path the
system cannot even look up (too long, a NUL byte) is one such line too, never a traceback.

:func:`load_dataset` and :func:`split_file_records` resolve a split's files with the same
helper (:func:`_split_files`), so the provenance a run records (path, size, md5, whether it
is the official file) is what it read. A file holding no images stops the load.

Downloads (:func:`download_dataset`, :func:`download_file`) check the destination before
any network access (created, writable, no folder where a file goes), stream to
``FILE.part`` and publish it under its name only with the official md5; the ``.part`` is
removed on every exit path (errors, Ctrl-C, SystemExit). Two limits, in seconds, bound a
download: ``stall_timeout`` (default 30; no byte for that long ends it; also the socket
timeout) and ``deadline`` (default 3600, for a whole ``download_dataset`` call, checked
between chunks). Each failure says which limit was hit and how to raise it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import math
import numbers
import os
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..registry import DATASETS, register_dataset
from .augment import DEFAULT_CROP_PADDING, Augment
from .formats import (
    CORRUPT_FIX,
    Batch,
    CorruptFileError,
    cifar_tensors,
    corrupt,
    load_idx,
    load_svhn_mat,
    open_for_reading,
    os_reason,
    read_cifar_batches,
    shown,
)

ENV_VAR = "SIGPROP_DATA"
# Module-level so tests (and unusual installs) can point them elsewhere.
SYSTEM_ROOT = Path("/usr/share/datasets")
CACHE_ROOT: Path | None = None  # None: $XDG_CACHE_HOME/sigprop or ~/.cache/sigprop

DEFAULT_STALL_TIMEOUT = 30.0  # seconds without a byte before a download gives up
DEFAULT_DEADLINE = 3600.0  # seconds for a whole download_dataset call

# (url, socket timeout in seconds) -> a response with .read (and ideally .read1)
Opener = Callable[[str, float], BinaryIO]


def _default_opener(url: str, timeout: float) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=timeout)


# Swappable for tests; download_dataset(opener=...) overrides it per call.
URL_OPENER: Opener = _default_opener


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name inside the dataset folder
    url: str
    md5: str
    optional: bool = False  # not needed for train/test (SVHN extra: 1.3 GB)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of pixel / 255
    std: tuple[float, ...]
    default_augment: Augment
    files: tuple[RemoteFile, ...]
    # split -> files (IDX, SVHN) or archive members (CIFAR) it is read from
    split_files: tuple[tuple[str, tuple[str, ...]], ...]
    format: str  # "idx" | "cifar" | "svhn"
    archive_folder: str = ""  # CIFAR: folder inside the .tar.gz / extracted folder name
    install_hint: str = ""  # extra way to get the files, for the not-found message

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.split_files)

    def files_for(self, split: str) -> tuple[str, ...]:
        for s, names in self.split_files:
            if s == split:
                return names
        raise ConfigError(
            f"unknown split {split!r} for dataset {self.name!r}; choose one of: "
            + ", ".join(self.splits)
        )

    @property
    def required_files(self) -> tuple[RemoteFile, ...]:
        return tuple(f for f in self.files if not f.optional)


# --------------------------------------------------------------------------- registry


def _idx_spec(name: str, base_url: str, md5s: tuple[str, str, str, str], **kw) -> DatasetSpec:
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    return DatasetSpec(
        name=name,
        shape=(1, 28, 28),
        num_classes=10,
        default_augment=Augment(),
        files=tuple(RemoteFile(n, base_url + n, m) for n, m in zip(names, md5s)),
        split_files=(("train", names[:2]), ("test", names[2:])),
        format="idx",
        **kw,
    )


@register_dataset("mnist")
def _mnist() -> DatasetSpec:
    return _idx_spec(
        "mnist",
        # yann.lecun.com now often refuses downloads; this is torchvision's mirror.
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
        mean=(0.1307,),
        std=(0.3081,),
    )


@register_dataset("fashion-mnist")
def _fashion_mnist() -> DatasetSpec:
    return _idx_spec(
        "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
        mean=(0.2860,),
        std=(0.3530,),
        install_hint="apt-get install -y dataset-fashion-mnist",
    )


def _cifar_spec(name: str, archive: str, md5: str, folder: str, classes: int,
                split_files: tuple[tuple[str, tuple[str, ...]], ...], **kw) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        shape=(3, 32, 32),
        num_classes=classes,
        # Sec. IV: random cropping for all datasets, horizontal flips for CIFAR.
        default_augment=Augment(crop_padding=DEFAULT_CROP_PADDING, flip=True),
        files=(RemoteFile(archive, "https://www.cs.toronto.edu/~kriz/" + archive, md5),),
        split_files=split_files,
        format="cifar",
        archive_folder=folder,
        **kw,
    )


@register_dataset("cifar10")
def _cifar10() -> DatasetSpec:
    return _cifar_spec(
        "cifar10",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        10,
        (("train", tuple(f"data_batch_{i}" for i in range(1, 6))), ("test", ("test_batch",))),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )


@register_dataset("cifar100")
def _cifar100() -> DatasetSpec:
    return _cifar_spec(
        "cifar100",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        100,
        (("train", ("train",)), ("test", ("test",))),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    )


@register_dataset("svhn")
def _svhn() -> DatasetSpec:
    url = "http://ufldl.stanford.edu/housenumbers/"
    train, test, extra = "train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"
    return DatasetSpec(
        name="svhn",
        shape=(3, 32, 32),
        num_classes=10,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        # Digits: a mirrored 2 or 5 is not a digit, so crop only.
        default_augment=Augment(crop_padding=DEFAULT_CROP_PADDING),
        files=(
            RemoteFile(train, url + train, "e26dedcc434d2e4c54c9b2d4a06d8373"),
            RemoteFile(test, url + test, "eb5a983be6a315427106f1b164d9cef3"),
            RemoteFile(extra, url + extra, "a93ce644f1a588dc4d68dda5feec44a7", optional=True),
        ),
        split_files=(
            ("train", (train,)),
            ("test", (test,)),
            ("extra", (extra,)),
            ("train+extra", (train, extra)),
        ),
        format="svhn",
    )


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset; unknown names raise ConfigError listing the choices."""
    return DATASETS.get(name)()


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """The user cache root: ``CACHE_ROOT``, ``$XDG_CACHE_HOME/sigprop`` or ``~/.cache/sigprop``."""
    if CACHE_ROOT is not None:
        return Path(CACHE_ROOT)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "sigprop"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):
        raise DataError("cannot find the user cache folder: the home folder is unknown; set "
                        "$HOME or $XDG_CACHE_HOME, or give the folder explicitly") from None
    return home / ".cache" / "sigprop"


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _probe_fix(err: BaseException) -> str:
    """How to fix a path the system refused to look up."""
    code = getattr(err, "errno", None)
    if isinstance(err, ValueError):
        return "remove the NUL character from it"
    if code == errno.ENAMETOOLONG:
        return "use a shorter path"
    if code in (errno.EACCES, errno.EPERM):
        return "make the folders on it accessible"
    if code == errno.ELOOP:
        return "fix the loop of symbolic links"
    return "check the path"


def _kind(path: Path, what: str = "path", fix: str = "") -> str:
    """What is at ``path``: "file", "dir", "missing", "below-file" (a parent is a file),
    "broken-link" or "other" (a fifo, socket or device). A path the system cannot even look
    up (too long, a NUL byte, no permission) is a one-line DataError naming ``what``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken-link" if _is_link(path) else "missing"
    except NotADirectoryError:
        return "below-file"
    except (OSError, ValueError) as e:  # ENAMETOOLONG, EACCES, ELOOP; ValueError: NUL byte
        alt = f", or {fix}" if fix else ""
        raise DataError(f"{what} {shown(path)} cannot be used ({os_reason(e)}); "
                        f"{_probe_fix(e)}{alt}") from None
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def _file_ancestor(path: Path) -> Path | None:
    """The nearest parent of ``path`` that exists and is not a folder."""
    for parent in path.parents:
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                return parent
            return None
        except (OSError, ValueError):
            continue
    return None


def _not_a_folder(path: Path, kind: str) -> str:
    """Why ``path`` (of ``kind``, not "dir") is no usable folder, as a sentence tail."""
    if kind == "missing":
        return "does not exist"
    if kind == "file":
        return "is a file, not a folder"
    if kind == "below-file":
        parent = _file_ancestor(path)
        where = f" ({shown(parent)} is a file, not a folder)" if parent else ""
        return f"does not exist{where}"
    if kind == "broken-link":
        return "is a broken symbolic link"
    return "is not a folder"


def _not_a_file(name: str, kind: str) -> str:
    """Why ``name`` (of ``kind``, not "file" or "missing") cannot be read as a data file."""
    if kind == "dir":
        return f"{name} is a directory, not a file"
    if kind == "broken-link":
        return f"{name} is a broken symbolic link"
    return f"{name} is not a regular file"


# --------------------------------------------------------------------------- lookup

# What a folder lacks: ("missing", "NAME (or ...)") or ("bad", "NAME is a directory, ...").
Problem = tuple[str, str]


def _file_problem(folder: Path, name: str, *alternatives: str) -> Problem | None:
    """None when ``folder/name`` (or one of its ``alternatives``) is a regular file."""
    kinds = [(n, _kind(folder / n)) for n in (name, *alternatives)]
    if any(k == "file" for _, k in kinds):
        return None
    for n, k in kinds:
        if k != "missing":
            return "bad", _not_a_file(n, k)
    return "missing", name + (" (or uncompressed)" if alternatives else "")


def _describe(problems: list[Problem]) -> str:
    """``lacks A, B, while C is a directory, not a file``."""
    missing = [text for k, text in problems if k == "missing"]
    bad = [text for k, text in problems if k == "bad"]
    parts = ["lacks " + ", ".join(missing)] if missing else []
    if bad:
        parts.append(("while " if missing else "") + ", ".join(bad))
    return ", ".join(parts)


def _idx_alternative(name: str) -> tuple[str, ...]:
    raw = name.removesuffix(".gz")
    return (raw,) if raw != name else ()


def _cifar_source(spec: DatasetSpec, folder: Path, members: tuple[str, ...]) -> Path | None:
    """Where the CIFAR pickles come from: extracted folder, the folder itself, or archive."""
    for candidate in (folder / spec.archive_folder, folder):
        if _kind(candidate) == "dir" and all(_kind(candidate / m) == "file" for m in members):
            return candidate
    archive = folder / spec.files[0].name
    return archive if _kind(archive) == "file" else None


def _cifar_problems(spec: DatasetSpec, folder: Path, members: tuple[str, ...]) -> list[Problem]:
    if _cifar_source(spec, folder, members) is not None:
        return []
    archive = spec.files[0].name
    kind = _kind(folder / archive)
    problems: list[Problem] = [
        ("missing", f"{archive} (or the extracted {spec.archive_folder}/)") if kind == "missing"
        else ("bad", _not_a_file(archive, kind))
    ]
    # A partly extracted folder: say what it lacks, too.
    for candidate, label in ((folder / spec.archive_folder, f"{spec.archive_folder}/"),
                             (folder, "the folder itself")):
        if _kind(candidate) != "dir" or all(_kind(candidate / m) == "missing" for m in members):
            continue
        inner = [p for m in members if (p := _file_problem(candidate, m))]
        problems.append(("bad", f"{label} holds some batches but {_describe(inner)}"))
        break
    return problems


def _all_members(spec: DatasetSpec) -> tuple[str, ...]:
    return tuple(m for _, names in spec.split_files for m in names)


def _problems(spec: DatasetSpec, folder: Path) -> list[Problem]:
    """What ``folder`` (a folder) lacks for the train and test splits; [] when nothing."""
    if spec.format == "cifar":
        return _cifar_problems(spec, folder, _all_members(spec))
    alternatives = _idx_alternative if spec.format == "idx" else (lambda name: ())
    found = (_file_problem(folder, f.name, *alternatives(f.name)) for f in spec.required_files)
    return [p for p in found if p]


def has_files(spec: DatasetSpec, folder: Path) -> bool:
    """Whether ``folder`` holds what the train and test splits need (a path that cannot be
    looked up does not)."""
    try:
        return _kind(folder) == "dir" and not _problems(spec, folder)
    except DataError:
        return False


def _describe_files(spec: DatasetSpec) -> str:
    if spec.format == "cifar":
        return f"{spec.files[0].name} or {spec.archive_folder}/"
    if spec.format == "idx":
        return ", ".join(f.name for f in spec.required_files) + " (or uncompressed)"
    return ", ".join(f.name for f in spec.required_files)


def _given_root(value: object, origin: str) -> Path:
    """The folder a user named (``data_dir`` or ``$SIGPROP_DATA``), ``~`` expanded."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{origin} must be a folder path, got {type(value).__name__}; "
                          "give the dataset's folder as a string")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise ConfigError(f"{origin} must be a folder path as text, got bytes; decode it first")
    if not text.strip():
        raise ConfigError(f"{origin} is empty; give the dataset's folder or leave it out")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~someone with no such user
        raise DataError(f"{origin} {shown(text)} names the home folder of an unknown user; "
                        "give the full path") from None


def _explicit_fix(spec: DatasetSpec, root: Path, origin: str, can_put: bool) -> str:
    """How to fix an unusable ``origin`` folder: fill it (``can_put``: it is, or can become,
    a folder) or point ``origin`` elsewhere."""
    point = ("point data_dir (--data-dir) at the folder that holds them" if origin == "data_dir"
             else f"set {origin} to the folder that holds them, or unset it to use the "
                  "default places")
    if not can_put:
        return f"{point} (`sigprop data download {spec.name}` fetches them)"
    return (f"put {spec.name}'s files there (`sigprop data download {spec.name} --dest "
            f"{shown(root)}`), or {point}")


def _explicit_dir(spec: DatasetSpec, root: Path, origin: str) -> Path:
    """``root`` or ``root/NAME``, whichever holds the files; else one DataError saying what
    is wrong in which folder. Nothing else is looked at."""
    kind = _kind(root, f"{origin} folder", f"point {origin} elsewhere")
    if kind != "dir":
        fix = _explicit_fix(spec, root, origin, can_put=kind == "missing")
        raise DataError(f"dataset {spec.name!r}: {origin} folder {shown(root)} "
                        f"{_not_a_folder(root, kind)}; {fix}")
    problems = _problems(spec, root)
    if not problems:
        return root
    sub = root / spec.name
    if _kind(sub) == "dir":
        sub_problems = _problems(spec, sub)
        if not sub_problems:
            return sub
        folder, problems, note = sub, sub_problems, ""
    else:
        folder, note = root, f" (which has no {spec.name}/ subfolder either)"
    raise DataError(f"dataset {spec.name!r}: {origin} folder {shown(folder)}{note} "
                    f"{_describe(problems)}; {_explicit_fix(spec, root, origin, True)}")


def _default_dir(spec: DatasetSpec) -> Path:
    """The first complete default place (system, then cache); else where it looked."""
    looked = []
    for folder, origin in ((Path(SYSTEM_ROOT) / spec.name, "system"),
                           (cache_root() / spec.name, "cache")):
        try:
            kind = _kind(folder)
            problems = _problems(spec, folder) if kind == "dir" else []
            if kind == "dir" and not problems:
                return folder
            why = _describe(problems) if problems else (
                "" if kind == "missing" else _not_a_folder(folder, kind))
        except DataError as e:  # cannot be looked up: say so, try the next place
            why = str(e).split(";")[0]
        looked.append(f"{shown(folder)} ({origin}{': ' + why if why else ''})")
    ways = [f"run `sigprop data download {spec.name}` (saves to {shown(cache_root() / spec.name)})"]
    if spec.install_hint:
        ways.append(f"`{spec.install_hint}`")
    ways.append(f"put the files in a folder and point data_dir or ${ENV_VAR} at it")
    raise DataError(
        f"dataset {spec.name!r} not found: need {_describe_files(spec)}; looked in: "
        f"{', '.join(looked)}. To get it: {', or '.join(ways)}."
    )


def find_dataset_dir(name: str, data_dir: Path | str | None = None) -> Path:
    """The folder dataset ``name`` is read from, by the rules of the module docstring:
    ``data_dir`` if given (only it), else ``$SIGPROP_DATA`` if set (only it), else the
    first complete default place. Raises ConfigError for an empty ``data_dir`` and one
    DataError line saying what is missing where otherwise."""
    spec = dataset_spec(name)
    if data_dir is not None:
        return _explicit_dir(spec, _given_root(data_dir, "data_dir"), "data_dir")
    env = os.environ.get(ENV_VAR)
    if env:
        origin = f"${ENV_VAR}"
        return _explicit_dir(spec, _given_root(env, origin), origin)
    return _default_dir(spec)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _SplitFiles:
    """The files one split reads, in reading order. CIFAR: ``members`` are the batches,
    read from ``paths[0]`` when ``archive`` (the .tar.gz), else each from its own path."""

    paths: tuple[Path, ...]
    members: tuple[str, ...] = ()
    archive: bool = False


def _need_file(spec: DatasetSpec, folder: Path, split: str, name: str, *alternatives: str) -> Path:
    """``folder/name`` (or an alternative) as stored; else a DataError naming the file."""
    for n in (name, *alternatives):
        if _kind(folder / n) == "file":
            return folder / n
    kind, text = _file_problem(folder, name, *alternatives) or ("missing", name)
    remote = _remote(spec, name)
    where = f"download it from {remote.url} into {shown(folder)}" if remote else \
        f"`sigprop data download {spec.name}`"
    if kind == "missing":
        raise DataError(f"{shown(folder / name)}: not found (split {split!r} of {spec.name!r} "
                        f"needs it); {where}")
    raise DataError(f"{shown(folder)}: {text} (split {split!r} of {spec.name!r} reads it); "
                    f"remove it and {where}")


def _split_files(spec: DatasetSpec, folder: Path, split: str) -> _SplitFiles:
    """The files ``split`` reads in ``folder``: the one resolution behind both
    :func:`load_dataset` and :func:`split_file_records`."""
    names = spec.files_for(split)
    if spec.format == "idx":
        return _SplitFiles(tuple(_need_file(spec, folder, split, n, *_idx_alternative(n))
                                 for n in names))
    if spec.format == "cifar":
        source = _cifar_source(spec, folder, names)
        if source is None:
            raise DataError(f"dataset {spec.name!r} split {split!r}: {shown(folder)} "
                            f"{_describe(_cifar_problems(spec, folder, names))}; "
                            f"`sigprop data download {spec.name}`")
        if _kind(source) == "file":
            return _SplitFiles((source,), names, archive=True)
        return _SplitFiles(tuple(source / m for m in names), names)
    if spec.format == "svhn":
        return _SplitFiles(tuple(_need_file(spec, folder, split, n) for n in names))
    raise AssertionError(f"unknown dataset format {spec.format!r}")


def _require_images(count: int, where: Path | str, spec: DatasetSpec, split: str) -> None:
    """An empty file would only fail later (an empty loader, a division by zero)."""
    if count == 0:
        raise CorruptFileError(
            f"{shown(where)}: holds no images (split {split!r} of dataset {spec.name!r}); "
            f"the file is empty or cut short - {CORRUPT_FIX}"
        )


def _read_split(spec: DatasetSpec, files: _SplitFiles, split: str) -> Batch:
    if spec.format == "idx":
        images, labels = load_idx(*files.paths)
        _require_images(len(images), files.paths[0], spec, split)
        return images, labels
    if spec.format == "cifar":
        source = files.paths[0] if files.archive else files.paths[0].parent
        parts = read_cifar_batches(source, files.members, spec.archive_folder)
        for where, data, _ in parts:
            _require_images(len(data), where, spec, split)
        return cifar_tensors(parts)
    if spec.format == "svhn":
        parts = [load_svhn_mat(p) for p in files.paths]
        for path, (images, _) in zip(files.paths, parts):
            _require_images(len(images), path, spec, split)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    raise AssertionError(f"unknown dataset format {spec.format!r}")


def _check_loaded(spec: DatasetSpec, split: str, images: torch.Tensor, labels: torch.Tensor,
                  folder: Path) -> None:
    # Readers validate the file format; this checks the content fits the dataset.
    where = f"dataset {spec.name!r} split {split!r} in {shown(folder)}"
    if tuple(images.shape[1:]) != spec.shape:
        raise DataError(f"{where}: images are {tuple(images.shape[1:])}, expected {spec.shape}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DataError(
            f"{where}: labels span {int(labels.min())}..{int(labels.max())}, "
            f"expected 0..{spec.num_classes - 1}"
        )


def load_dataset(name: str, split: str, data_dir: Path | str | None = None) -> Batch:
    """``(images uint8 (N, C, H, W), labels int64 (N,))`` of one split, on the CPU.

    The folder is :func:`find_dataset_dir`'s; a file of the split that holds no images is a
    DataError naming it."""
    spec = dataset_spec(name)
    spec.files_for(split)  # bad split: ConfigError before any disk access
    folder = find_dataset_dir(name, data_dir)
    files = _split_files(spec, folder, split)
    try:
        images, labels = _read_split(spec, files, split)
    except CorruptFileError as e:
        raise CorruptFileError(f"{e} (`sigprop data download {name}`)") from None
    _check_loaded(spec, split, images, labels, folder)
    return images, labels


def _remote(spec: DatasetSpec, name: str) -> RemoteFile | None:
    return next((f for f in spec.files if f.name == name), None)


def file_md5(path: Path | str, chunk: int = 1 << 20) -> str:
    """The md5 of a file as hex; an unreadable file is a DataError naming it."""
    h = hashlib.md5()
    with open_for_reading(Path(path)) as f:
        try:
            while block := f.read(chunk):
                h.update(block)
        except OSError as e:
            raise corrupt(path, f"cannot read ({os_reason(e)})") from None
    return h.hexdigest()


def _file_record(spec: DatasetSpec, path: Path) -> dict:
    try:
        size = os.stat(path).st_size
    except (OSError, ValueError) as e:
        raise DataError(f"{shown(path)}: cannot be read ({os_reason(e)}); check the file") from None
    digest = file_md5(path)
    remote = _remote(spec, path.name)  # only a file as downloaded compares
    return {"path": str(path.absolute()), "bytes": size, "md5": digest,
            "official_md5": None if remote is None else digest == remote.md5}


def split_paths(name: str, split: str, data_dir: Path | str | None = None) -> list[Path]:
    """The files ``load_dataset(name, split, data_dir)`` would read, found without reading
    them; a DataError naming what is missing otherwise."""
    spec = dataset_spec(name)
    spec.files_for(split)
    return list(_split_files(spec, find_dataset_dir(name, data_dir), split).paths)


def split_file_records(name: str, split: str, data_dir: Path | str | None = None) -> list[dict]:
    """One record per file ``load_dataset(name, split, data_dir)`` reads, for provenance:
    ``{"path": absolute str, "bytes": int, "md5": hex str, "official_md5": bool | None}``.

    ``official_md5`` says whether the file equals the official download; it is None when
    the file is not one as downloaded (a decompressed IDX file, an extracted CIFAR batch).
    The files come from the same resolution as :func:`load_dataset`'s, so they cannot drift.
    """
    spec = dataset_spec(name)
    spec.files_for(split)
    folder = find_dataset_dir(name, data_dir)
    return [_file_record(spec, p) for p in _split_files(spec, folder, split).paths]


# --------------------------------------------------------------------------- download

_CHUNK = 1 << 20  # read1 returns what one receive gives, up to this
_SMALL_READ = 1 << 16  # responses without read1: small reads keep the deadline checked
_SOCKET_MAX = 1e9  # seconds; the OS rejects larger socket timeouts (time_t overflow)
_TIMEOUTS = (TimeoutError, socket.timeout)


def _seconds(value: object, key: str) -> float:
    """A positive, finite number of seconds, else a ConfigError naming ``key``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        flag = "--" + key.replace("_", "-")
        raise ConfigError(f"{key} must be a positive, finite number of seconds, got "
                          f"{shown(repr(value))}; pass e.g. {key}=30 ({flag} 30)")
    return float(value)  # type: ignore[arg-type]


class _Deadline:
    """The time limit shared by every file of one download call."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


def _deadline_error(url: str, deadline: _Deadline) -> DataError:
    return DataError(
        f"downloading {shown(url)} did not finish within the deadline of {deadline.seconds:g} s; "
        "raise it with --deadline SECONDS (deadline= in Python) or try a faster network"
    )


def _stall_error(url: str, stall: float) -> DataError:
    return DataError(
        f"downloading {shown(url)} stalled: no data for {stall:g} s (the stall timeout); try "
        "again later, or raise it with --stall-timeout SECONDS (stall_timeout= in Python)"
    )


def _is_timeout(err: BaseException) -> bool:
    reason = getattr(err, "reason", None) if isinstance(err, urllib.error.URLError) else None
    return isinstance(err, _TIMEOUTS) or isinstance(reason, _TIMEOUTS)


def _writable_dir(folder: Path, what: str = "download folder") -> None:
    """Create ``folder`` if needed and prove it writable (a temp file made and removed),
    before any network access; root ignores permission bits, so this really writes."""
    fix = "choose another --dest (dest_dir=)"
    kind = _kind(folder, what, fix)
    if kind == "missing":
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            raise DataError(f"{what} {shown(folder)} cannot be created ({os_reason(e)}); "
                            f"{fix}") from None
    elif kind != "dir":
        raise DataError(f"{what} {shown(folder)} {_not_a_folder(folder, kind)}; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sigprop-write-check-", dir=folder)
    except OSError as e:
        raise DataError(f"{what} {shown(folder)} is not writable ({os_reason(e)}); "
                        f"{fix}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _check_dest_file(dest: Path) -> None:
    """``dest`` and its ``.part`` must be absent or regular files (never a folder)."""
    for path in (dest, _part(dest)):
        kind = _kind(path, "download target", "choose another --dest (dest_dir=)")
        if kind not in ("missing", "file"):
            raise DataError(f"{_not_a_file(shown(path), kind)}, so the download cannot be "
                            "saved there; remove it or choose another --dest (dest_dir=)")


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _content_length(resp: object) -> int | None:
    headers = getattr(resp, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _stream(resp: BinaryIO, out: BinaryIO, part: Path, bar: tqdm, url: str,
            deadline: _Deadline) -> tuple[str, int]:
    """Copy ``resp`` to ``out``; (md5 hex, bytes). read1 returns whatever one receive gets,
    so a server dripping bytes cannot keep one call (and the deadline check) waiting."""
    read1 = getattr(resp, "read1", None)
    h, got = hashlib.md5(), 0
    while True:
        if deadline.expired():
            raise _deadline_error(url, deadline)
        block = read1(_CHUNK) if read1 is not None else resp.read(_SMALL_READ)
        if not block:
            return h.hexdigest(), got
        try:
            out.write(block)
        except OSError as e:
            raise DataError(f"cannot write {shown(part)} ({os_reason(e)}); free some space or "
                            "choose another --dest (dest_dir=)") from None
        h.update(block)
        got += len(block)
        bar.update(len(block))


def _transfer(url: str, part: Path, label: str, progress: bool, opener: Opener, stall: float,
              deadline: _Deadline) -> tuple[str, int, int | None]:
    """Download ``url`` into ``part``: (md5 hex, bytes received, Content-Length or None)."""
    if deadline.expired():
        raise _deadline_error(url, deadline)
    # The socket timeout is the stall timeout, or less when the deadline is nearer.
    timeout = min(stall, deadline.remaining(), _SOCKET_MAX)
    try:
        out = open(part, "wb")  # noqa: SIM115 - closed by the with below; its error is ours
    except OSError as e:
        raise DataError(f"cannot create {shown(part)} ({os_reason(e)}); choose another --dest "
                        "(dest_dir=)") from None
    try:
        with out, opener(url, timeout) as resp:
            size = _content_length(resp)
            with tqdm(total=size, unit="B", unit_scale=True, desc=label,
                      disable=not progress) as bar:
                digest, got = _stream(resp, out, part, bar, url, deadline)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        if _is_timeout(e):
            hit_deadline = timeout < stall or deadline.expired()
            raise (_deadline_error(url, deadline) if hit_deadline
                   else _stall_error(url, stall)) from None
        raise DataError(f"downloading {shown(url)} failed ({shown(e)}); check the network, or "
                        f"fetch it by hand into {shown(part.with_suffix(''))}") from None
    return digest, got, size


def _fetch(url: str, dest: Path, md5: str, progress: bool, opener: Opener, stall: float,
           deadline: _Deadline) -> Path:
    """Stream ``url`` to ``dest.part``; publish it as ``dest`` only if complete with the
    right md5. The ``.part`` is removed on every way out, Ctrl-C and SystemExit included."""
    part = _part(dest)
    try:
        digest, got, size = _transfer(url, part, dest.name, progress, opener, stall, deadline)
        if size is not None and got != size:
            raise DataError(f"downloading {shown(url)} ended after {got} of {size} bytes (the "
                            "connection closed early); try again")
        if digest != md5:
            raise DataError(
                f"downloaded {shown(url)} has md5 {digest}, expected {md5}; the download was "
                f"corrupted or the server changed the file - try again"
            )
        try:
            os.replace(part, dest)  # atomic: readers never see a partial file under the name
        except OSError as e:
            raise DataError(f"cannot save {shown(dest)} ({os_reason(e)}); remove what is "
                            "there or choose another --dest (dest_dir=)") from None
    finally:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
    return dest


def download_file(url: str, dest: Path | str, md5: str, *, progress: bool = True,
                  opener: Opener | None = None, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                  deadline: float = DEFAULT_DEADLINE) -> Path:
    """Stream ``url`` to ``dest`` via ``dest.part``; publish it atomically only if md5 matches.

    ``stall_timeout``: seconds without a byte (connecting included) before giving up; it is
    the socket timeout. ``deadline``: seconds for the whole file, checked between chunks.
    Both must be positive and finite (else ConfigError). ``opener(url, timeout)`` replaces
    ``URL_OPENER``. The folder of ``dest`` is created and checked writable before the
    network is touched; every failure is one DataError line, and no ``.part`` is left.
    """
    stall, limit = _seconds(stall_timeout, "stall_timeout"), _seconds(deadline, "deadline")
    dest = Path(dest)
    _writable_dir(dest.parent)
    _check_dest_file(dest)
    return _fetch(url, dest, md5, progress, opener or URL_OPENER, stall, _Deadline(limit))


def download_dataset(name: str, dest_dir: Path | str | None = None, progress: bool = True, *,
                     include_optional: bool = False, opener: Opener | None = None,
                     stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                     deadline: float = DEFAULT_DEADLINE) -> Path:
    """Download dataset ``name``'s files into ``dest_dir/<name>`` and return that folder.

    ``dest_dir`` defaults to the user cache root; a ``dest_dir`` already named ``<name>``
    is used as is. Before any network access the folder is created and proved writable,
    and no file to download may be a folder there: else one DataError line. Files already
    present with the right md5 are skipped. ``include_optional`` also fetches optional
    files (SVHN ``extra``, 1.3 GB). ``stall_timeout`` (seconds without a byte, default 30)
    and ``deadline`` (seconds for this whole call, default 3600) bound the time; both must
    be positive and finite (else ConfigError). ``opener(url, timeout)`` replaces
    ``URL_OPENER``.
    """
    stall, limit = _seconds(stall_timeout, "stall_timeout"), _seconds(deadline, "deadline")
    clock = _Deadline(limit)
    spec = dataset_spec(name)
    root = _given_root(dest_dir, "dest_dir") if dest_dir is not None else cache_root()
    folder = root if root.name == name else root / name
    _writable_dir(folder)
    wanted = [f for f in spec.files if include_optional or not f.optional]
    for f in wanted:
        _check_dest_file(folder / f.name)
    for f in wanted:
        dest = folder / f.name
        if _kind(dest) == "file" and file_md5(dest) == f.md5:
            continue
        _fetch(f.url, dest, f.md5, progress, opener or URL_OPENER, stall, clock)
    return folder


# --------------------------------------------------------------------------- check


@dataclass(frozen=True)
class FileCheck:
    name: str
    path: Path | None  # None when absent
    md5: str | None  # None when absent or not comparable (decompressed / extracted copy)
    expected_md5: str
    # "ok" | "md5 mismatch" | "decompressed" (raw IDX) | "extracted" (CIFAR folder)
    # | "missing" | "optional, absent"
    status: str


@dataclass(frozen=True)
class SplitCheck:
    split: str
    ok: bool
    detail: str  # "60000 images" or the error message


@dataclass(frozen=True)
class DatasetCheck:
    name: str
    directory: Path
    files: tuple[FileCheck, ...]
    splits: tuple[SplitCheck, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Every checked split loads. An md5 mismatch alone is not fatal: distro packages
        re-compress files, which changes the md5 but not the content."""
        return all(s.ok for s in self.splits)

    def summary(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"{self.name}: {self.directory}"]
        for f in self.files:
            line = f"  {f.name}: {f.status}"
            if f.status == "md5 mismatch":
                line += f" (md5 {f.md5}, official {f.expected_md5})"
            lines.append(line)
        for s in self.splits:
            lines.append(f"  split {s.split}: {'ok' if s.ok else 'FAILED'} - {s.detail}")
        if self.ok and any(f.status == "md5 mismatch" for f in self.files):
            lines.append("  (an md5 mismatch on files that load is harmless, e.g. a distro "
                         "package re-compressed them)")
        return "\n".join(lines)


def _check_file(spec: DatasetSpec, folder: Path, f: RemoteFile) -> FileCheck:
    path = folder / f.name
    if _kind(path) == "file":
        md5 = file_md5(path)
        return FileCheck(f.name, path, md5, f.md5, "ok" if md5 == f.md5 else "md5 mismatch")
    raw = [folder / n for n in _idx_alternative(f.name)] if spec.format == "idx" else []
    if raw and _kind(raw[0]) == "file":
        return FileCheck(f.name, raw[0], None, f.md5, "decompressed")
    if spec.format == "cifar" and _cifar_source(spec, folder, _all_members(spec)) is not None:
        return FileCheck(f.name, None, None, f.md5, "extracted")
    return FileCheck(f.name, None, None, f.md5, "optional, absent" if f.optional else "missing")


def check_dataset(
    name: str, data_dir: Path | str | None = None, *, load: bool = True
) -> DatasetCheck:
    """Where dataset ``name`` was found, each file's md5 against the official one, and
    (``load=True``) whether each split with its files present actually loads."""
    spec = dataset_spec(name)
    folder = find_dataset_dir(name, data_dir)
    files = tuple(_check_file(spec, folder, f) for f in spec.files)
    absent = {f.name for f in files if f.status in ("missing", "optional, absent")}
    splits = []
    for split in spec.splits if load else ():
        if spec.format == "svhn" and absent & set(spec.files_for(split)):
            continue  # e.g. "extra" not downloaded: nothing to check
        try:
            images, _ = load_dataset(name, split, folder)
            splits.append(SplitCheck(split, True, f"{len(images)} images"))
        except DataError as e:
            splits.append(SplitCheck(split, False, str(e)))
    return DatasetCheck(name, folder, files, tuple(splits))
