"""Checking a dataset where it is found: each file's md5 against the official one, and
whether each split loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .datasets import (
    all_members,
    cifar_source,
    file_md5,
    find_dataset_dir,
    idx_alternative,
    load_dataset,
)
from .paths import path_kind
from .specs import DatasetSpec, RemoteFile, dataset_spec


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

    def failure(self) -> str | None:
        """The first failed split as one line (its error names the file and the fix), or
        None when every checked split loads."""
        bad = next((s for s in self.splits if not s.ok), None)
        return None if bad is None else f"{self.name}: split {bad.split}: {bad.detail}"

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
    if path_kind(path) == "file":
        md5 = file_md5(path)
        return FileCheck(f.name, path, md5, f.md5, "ok" if md5 == f.md5 else "md5 mismatch")
    raw = [folder / n for n in idx_alternative(f.name)] if spec.format == "idx" else []
    if raw and path_kind(raw[0]) == "file":
        return FileCheck(f.name, raw[0], None, f.md5, "decompressed")
    if spec.format == "cifar" and cifar_source(spec, folder, all_members(spec)) is not None:
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
