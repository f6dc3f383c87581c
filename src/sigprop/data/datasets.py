"""Dataset specs, where their files live, and how to load, download and check them.

Lookup order for a dataset ``NAME`` (first folder holding its files wins):
explicit ``data_dir`` -> ``$SIGPROP_DATA`` -> ``/usr/share/datasets/NAME`` -> user cache
(``$XDG_CACHE_HOME/sigprop/NAME`` or ``~/.cache/sigprop/NAME``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
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
from .formats import Batch, CorruptFileError, idx_path, load_cifar, load_idx, load_svhn_mat

ENV_VAR = "SIGPROP_DATA"
# Module-level so tests (and unusual installs) can point them elsewhere.
SYSTEM_ROOT = Path("/usr/share/datasets")
CACHE_ROOT: Path | None = None  # None: $XDG_CACHE_HOME/sigprop or ~/.cache/sigprop

Opener = Callable[[str], BinaryIO]


def _default_opener(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)


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


# --------------------------------------------------------------------------- lookup


def cache_root() -> Path:
    if CACHE_ROOT is not None:
        return Path(CACHE_ROOT)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sigprop"


def _cifar_source(spec: DatasetSpec, folder: Path, members: tuple[str, ...]) -> Path | None:
    """Where the CIFAR pickles come from: extracted folder, the folder itself, or archive."""
    for candidate in (folder / spec.archive_folder, folder):
        if all((candidate / m).is_file() for m in members):
            return candidate
    archive = folder / spec.files[0].name
    return archive if archive.is_file() else None


def _all_members(spec: DatasetSpec) -> tuple[str, ...]:
    return tuple(m for _, names in spec.split_files for m in names)


def has_files(spec: DatasetSpec, folder: Path) -> bool:
    """Whether ``folder`` holds what the train and test splits need."""
    if not folder.is_dir():
        return False
    if spec.format == "cifar":
        return _cifar_source(spec, folder, _all_members(spec)) is not None
    if spec.format == "idx":
        return all(idx_path(folder, f.name).is_file() for f in spec.required_files)
    return all((folder / f.name).is_file() for f in spec.required_files)


def _candidates(name: str, data_dir: Path | str | None) -> list[tuple[Path, str]]:
    """Folders to try, in order, each with where it came from (for the error message)."""
    out: list[tuple[Path, str]] = []
    for root, origin in ((data_dir, "data_dir"), (os.environ.get(ENV_VAR) or None, ENV_VAR)):
        if root is not None:
            root = Path(root).expanduser()
            # Accept the dataset folder itself or a parent holding <name>/.
            out += [(root, origin), (root / name, origin)]
    out.append((Path(SYSTEM_ROOT) / name, "system"))
    out.append((cache_root() / name, "cache"))
    return out


def _describe_files(spec: DatasetSpec) -> str:
    if spec.format == "cifar":
        return f"{spec.files[0].name} or {spec.archive_folder}/"
    if spec.format == "idx":
        return ", ".join(f.name for f in spec.required_files) + " (or uncompressed)"
    return ", ".join(f.name for f in spec.required_files)


def find_dataset_dir(name: str, data_dir: Path | str | None = None) -> Path:
    """The first folder in the lookup order that holds dataset ``name``'s files."""
    spec = dataset_spec(name)
    candidates = _candidates(name, data_dir)
    for folder, _ in candidates:
        if has_files(spec, folder):
            return folder
    looked = "; ".join(f"{folder} ({origin})" for folder, origin in candidates)
    ways = [f"run `sigprop data download {name}` (saves to {cache_root() / name})"]
    if spec.install_hint:
        ways.append(f"`{spec.install_hint}`")
    ways.append(f"put the files in a folder and point data_dir or ${ENV_VAR} at it")
    raise DataError(
        f"dataset {name!r} not found: need {_describe_files(spec)}; looked in: {looked}. "
        f"To get it: {', or '.join(ways)}."
    )


# --------------------------------------------------------------------------- loading


def _read_split(spec: DatasetSpec, folder: Path, split: str) -> Batch:
    names = spec.files_for(split)
    if spec.format == "idx":
        return load_idx(idx_path(folder, names[0]), idx_path(folder, names[1]))
    if spec.format == "cifar":
        source = _cifar_source(spec, folder, names)
        if source is None:
            raise DataError(f"{folder}: neither {_describe_files(spec)} found")
        return load_cifar(source, names, spec.archive_folder)
    if spec.format == "svhn":
        for n in names:
            if not (folder / n).is_file():  # only optional files can be absent here
                raise DataError(
                    f"{folder / n}: not found (split {split!r} of {spec.name!r} needs it); "
                    f"download it from {_remote(spec, n).url} into {folder}"
                )
        parts = [load_svhn_mat(folder / n) for n in names]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    raise AssertionError(f"unknown dataset format {spec.format!r}")


def _check_loaded(spec: DatasetSpec, split: str, images: torch.Tensor, labels: torch.Tensor,
                  folder: Path) -> None:
    # Readers validate the file format; this checks the content fits the dataset.
    where = f"dataset {spec.name!r} split {split!r} in {folder}"
    if tuple(images.shape[1:]) != spec.shape:
        raise DataError(f"{where}: images are {tuple(images.shape[1:])}, expected {spec.shape}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DataError(
            f"{where}: labels span {int(labels.min())}..{int(labels.max())}, "
            f"expected 0..{spec.num_classes - 1}"
        )


def load_dataset(name: str, split: str, data_dir: Path | str | None = None) -> Batch:
    """``(images uint8 (N, C, H, W), labels int64 (N,))`` of one split, on the CPU."""
    spec = dataset_spec(name)
    spec.files_for(split)  # bad split: ConfigError before any disk access
    folder = find_dataset_dir(name, data_dir)
    try:
        images, labels = _read_split(spec, folder, split)
    except CorruptFileError as e:
        raise CorruptFileError(f"{e} (`sigprop data download {name}`)") from None
    _check_loaded(spec, split, images, labels, folder)
    return images, labels


def _remote(spec: DatasetSpec, name: str) -> RemoteFile:
    return next(f for f in spec.files if f.name == name)


# --------------------------------------------------------------------------- download


def file_md5(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: Path | str, md5: str, *, progress: bool = True,
                  opener: Opener | None = None) -> Path:
    """Stream ``url`` to ``dest`` via ``dest.part``; publish it atomically only if md5 matches."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5()
    try:
        with (opener or URL_OPENER)(url) as resp, open(part, "wb") as out:
            size = getattr(resp, "headers", {}).get("Content-Length")
            with tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                      desc=dest.name, disable=not progress) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        part.unlink(missing_ok=True)
        raise DataError(
            f"downloading {url} failed ({e}); check the network, or fetch it by hand into {dest}"
        ) from None
    except BaseException:  # Ctrl-C: never leave a half file behind
        part.unlink(missing_ok=True)
        raise
    if h.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"downloaded {url} has md5 {h.hexdigest()}, expected {md5}; the download was "
            f"corrupted or the server changed the file - try again"
        )
    os.replace(part, dest)  # atomic: readers never see a partial file under the real name
    return dest


def download_dataset(name: str, dest_dir: Path | str | None = None, progress: bool = True, *,
                     include_optional: bool = False, opener: Opener | None = None) -> Path:
    """Download dataset ``name``'s files into ``dest_dir/<name>`` and return that folder.

    ``dest_dir`` defaults to the user cache root; a ``dest_dir`` already named ``<name>``
    is used as is. Files already present with the right md5 are skipped.
    ``include_optional`` also fetches optional files (SVHN ``extra``, 1.3 GB).
    """
    spec = dataset_spec(name)
    root = Path(dest_dir).expanduser() if dest_dir is not None else cache_root()
    folder = root if root.name == name else root / name
    for f in spec.files:
        if f.optional and not include_optional:
            continue
        dest = folder / f.name
        if dest.is_file() and file_md5(dest) == f.md5:
            continue
        download_file(f.url, dest, f.md5, progress=progress, opener=opener)
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
    if path.is_file():
        md5 = file_md5(path)
        return FileCheck(f.name, path, md5, f.md5, "ok" if md5 == f.md5 else "md5 mismatch")
    if spec.format == "idx" and idx_path(folder, f.name).is_file():
        return FileCheck(f.name, idx_path(folder, f.name), None, f.md5, "decompressed")
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
