"""Where a dataset's files live, and loading a split from them.

Where dataset ``NAME`` is read from - the first rule that applies decides, and nothing
falls back to another place, so a run never trains on other data than it was pointed at:

1. an explicit ``data_dir``: only that folder, or its ``NAME/`` subfolder;
2. else a non-empty ``$SIGPROP_DATA``: only that folder, or its ``NAME/`` subfolder;
3. else the default places, the first complete one wins: ``/usr/share/datasets/NAME``, then
   the user cache (``$XDG_CACHE_HOME/sigprop/NAME`` or ``~/.cache/sigprop/NAME``).

When the folder of rule 1 or 2 is unusable, one DataError line names the origin, the
folder and exactly what is wrong there (does not exist, is a file, lacks file X, X is a
directory), and how to fix it.

:func:`load_dataset` and :func:`split_file_records` resolve a split's files with the same
helper (:func:`_split_files`), so the provenance a run records (path, size, md5, whether it
is the official file) is what it read. A file holding no images stops the load.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .formats import (
    CORRUPT_FIX,
    Batch,
    CorruptFileError,
    check_gzip_start,
    check_idx,
    check_mat_start,
    check_pickle_start,
    cifar_tensors,
    corrupt,
    load_idx,
    load_svhn_mat,
    open_for_reading,
    os_reason,
    read_cifar_batches,
    shown,
)
from .paths import given_root, not_a_file, not_a_folder, path_kind
from .specs import DatasetSpec, RemoteFile, dataset_spec

ENV_VAR = "SIGPROP_DATA"
# Module-level so tests (and unusual installs) can point them elsewhere.
SYSTEM_ROOT = Path("/usr/share/datasets")
CACHE_ROOT: Path | None = None  # None: $XDG_CACHE_HOME/sigprop or ~/.cache/sigprop


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


# --------------------------------------------------------------------------- lookup

# What a folder lacks: ("missing", "NAME (or ...)") or ("bad", "NAME is a directory, ...").
Problem = tuple[str, str]


def _file_problem(folder: Path, name: str, *alternatives: str) -> Problem | None:
    """None when ``folder/name`` (or one of its ``alternatives``) is a regular file."""
    kinds = [(n, path_kind(folder / n)) for n in (name, *alternatives)]
    if any(k == "file" for _, k in kinds):
        return None
    for n, k in kinds:
        if k != "missing":
            return "bad", not_a_file(n, k)
    return "missing", name + (" (or uncompressed)" if alternatives else "")


def _describe(problems: list[Problem]) -> str:
    """``lacks A, B, while C is a directory, not a file``."""
    missing = [text for k, text in problems if k == "missing"]
    bad = [text for k, text in problems if k == "bad"]
    parts = ["lacks " + ", ".join(missing)] if missing else []
    if bad:
        parts.append(("while " if missing else "") + ", ".join(bad))
    return ", ".join(parts)


def idx_alternative(name: str) -> tuple[str, ...]:
    """The decompressed name of an IDX ``.gz`` file, which is read in its place."""
    raw = name.removesuffix(".gz")
    return (raw,) if raw != name else ()


def cifar_source(spec: DatasetSpec, folder: Path, members: tuple[str, ...]) -> Path | None:
    """Where the CIFAR pickles come from: extracted folder, the folder itself, or archive."""
    for candidate in (folder / spec.archive_folder, folder):
        if path_kind(candidate) == "dir" and all(path_kind(candidate / m) == "file"
                                                 for m in members):
            return candidate
    archive = folder / spec.files[0].name
    return archive if path_kind(archive) == "file" else None


def _cifar_problems(spec: DatasetSpec, folder: Path, members: tuple[str, ...]) -> list[Problem]:
    if cifar_source(spec, folder, members) is not None:
        return []
    archive = spec.files[0].name
    kind = path_kind(folder / archive)
    problems: list[Problem] = [
        ("missing", f"{archive} (or the extracted {spec.archive_folder}/)") if kind == "missing"
        else ("bad", not_a_file(archive, kind))
    ]
    # A partly extracted folder: say what it lacks, too.
    for candidate, label in ((folder / spec.archive_folder, f"{spec.archive_folder}/"),
                             (folder, "the folder itself")):
        if path_kind(candidate) != "dir" or all(path_kind(candidate / m) == "missing"
                                                for m in members):
            continue
        inner = [p for m in members if (p := _file_problem(candidate, m))]
        problems.append(("bad", f"{label} holds some batches but {_describe(inner)}"))
        break
    return problems


def all_members(spec: DatasetSpec) -> tuple[str, ...]:
    """Every file or CIFAR batch the splits of ``spec`` read, in order."""
    return tuple(m for _, names in spec.split_files for m in names)


def _problems(spec: DatasetSpec, folder: Path) -> list[Problem]:
    """What ``folder`` (a folder) lacks for the train and test splits; [] when nothing."""
    if spec.format == "cifar":
        return _cifar_problems(spec, folder, all_members(spec))
    alternatives = idx_alternative if spec.format == "idx" else (lambda name: ())
    found = (_file_problem(folder, f.name, *alternatives(f.name)) for f in spec.required_files)
    return [p for p in found if p]


def has_files(spec: DatasetSpec, folder: Path) -> bool:
    """Whether ``folder`` holds what the train and test splits need (a path that cannot be
    looked up does not)."""
    try:
        return path_kind(folder) == "dir" and not _problems(spec, folder)
    except DataError:
        return False


def _describe_files(spec: DatasetSpec) -> str:
    if spec.format == "cifar":
        return f"{spec.files[0].name} or {spec.archive_folder}/"
    if spec.format == "idx":
        return ", ".join(f.name for f in spec.required_files) + " (or uncompressed)"
    return ", ".join(f.name for f in spec.required_files)


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
    kind = path_kind(root, f"{origin} folder", f"point {origin} elsewhere")
    if kind != "dir":
        fix = _explicit_fix(spec, root, origin, can_put=kind == "missing")
        raise DataError(f"dataset {spec.name!r}: {origin} folder {shown(root)} "
                        f"{not_a_folder(root, kind)}; {fix}")
    problems = _problems(spec, root)
    if not problems:
        return root
    sub = root / spec.name
    if path_kind(sub) == "dir":
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
            kind = path_kind(folder)
            problems = _problems(spec, folder) if kind == "dir" else []
            if kind == "dir" and not problems:
                return folder
            why = _describe(problems) if problems else (
                "" if kind == "missing" else not_a_folder(folder, kind))
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
        return _explicit_dir(spec, given_root(data_dir, "data_dir"), "data_dir")
    env = os.environ.get(ENV_VAR)
    if env:
        origin = f"${ENV_VAR}"
        return _explicit_dir(spec, given_root(env, origin), origin)
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
        if path_kind(folder / n) == "file":
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
        return _SplitFiles(tuple(_need_file(spec, folder, split, n, *idx_alternative(n))
                                 for n in names))
    if spec.format == "cifar":
        source = cifar_source(spec, folder, names)
        if source is None:
            raise DataError(f"dataset {spec.name!r} split {split!r}: {shown(folder)} "
                            f"{_describe(_cifar_problems(spec, folder, names))}; "
                            f"`sigprop data download {spec.name}`")
        if path_kind(source) == "file":
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
        raise DataError(f"{where}: images are {tuple(images.shape[1:])}, expected {spec.shape}; "
                        f"these are not {spec.name}'s files - delete them and `sigprop data "
                        f"download {spec.name}`")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DataError(
            f"{where}: labels span {int(labels.min())}..{int(labels.max())}, "
            f"expected 0..{spec.num_classes - 1}; these are not {spec.name}'s files, or they "
            f"are damaged - delete them and `sigprop data download {spec.name}`"
        )


def _check_headers(spec: DatasetSpec, files: _SplitFiles, split: str) -> None:
    """What :func:`_read_split` would find wrong that the files' headers and sizes show."""
    if spec.format == "idx":
        images, labels = files.paths
        dims = check_idx(images, ndim=3)
        (count,) = check_idx(labels, ndim=1)
        if count != dims[0]:
            raise corrupt(labels, f"{count} labels for {dims[0]} images in {shown(images)}")
        _require_images(dims[0], images, spec, split)
        if dims[1:] != spec.shape[1:]:
            raise corrupt(images, f"images are {dims[1]}x{dims[2]}, {spec.name} has "
                                  f"{spec.shape[1]}x{spec.shape[2]}")
    elif spec.format == "cifar":
        for path in files.paths:
            (check_gzip_start if files.archive else check_pickle_start)(path)
    elif spec.format == "svhn":
        for path in files.paths:
            check_mat_start(path)
    else:
        raise AssertionError(f"unknown dataset format {spec.format!r}")


def check_split_files(name: str, split: str, data_dir: Path | str | None = None) -> list[Path]:
    """The files ``load_dataset(name, split, data_dir)`` reads, found and checked without
    loading them: IDX headers against the file sizes and each other, the magic bytes of
    CIFAR and SVHN files. A cheap check before work starts: what it passes may still fail to
    load (a bad CRC, a damaged pickle), never the other way round. Errors as load_dataset's."""
    spec = dataset_spec(name)
    spec.files_for(split)
    files = _split_files(spec, find_dataset_dir(name, data_dir), split)
    try:
        _check_headers(spec, files, split)
    except CorruptFileError as e:
        raise CorruptFileError(f"{e} (`sigprop data download {name}`)") from None
    return list(files.paths)


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
