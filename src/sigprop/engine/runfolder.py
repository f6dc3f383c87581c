"""A run folder held by one training at a time.

``RunFolder.acquire(path)`` checks the path (not empty, not a file or below one),
creates the folder, and takes an exclusive ``fcntl.flock`` on ``.lock`` inside it, so a
second training into the same folder stops with one line instead of mixing its files
with the first's. The OS drops the lock when the process ends, however it ends: a
killed run never leaves a stale lock. A training that fails before writing anything
removes the folders it created (:meth:`RunFolder.discard_if_unused`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import RunFolderError

LOCK = ".lock"


def _os_reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


class RunFolder:
    """A created, locked run folder; release with :meth:`release` (or ``with``)."""

    def __init__(self, path: Path, fd: int, created: list[Path]) -> None:
        self.path = path
        self._fd: int | None = fd
        self._created = created  # folders this acquire made, outermost first

    @classmethod
    def acquire(cls, path: str | os.PathLike, *, flag: str = "--run-dir",
                user: str = "training run") -> RunFolder:
        """Check, create and lock ``path``; messages name the option that gave it
        (``flag``) and what holds such folders (``user``)."""
        path = _checked_path(path, flag)
        created = _make_folder(path, flag)
        try:
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            _remove_created(created)
            raise RunFolderError(
                f"run folder {path} is not writable ({_os_reason(err)}); choose another "
                f"{flag}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _lock_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"cannot lock run folder {path} ({_os_reason(err)})") from None
            raise RunFolderError(
                f"run folder {path} is in use by another {user}{holder}; wait for it "
                f"to end, or choose another {flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd, created)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it would race a waiting run)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def discard_if_unused(self) -> None:
        """Remove the folders this acquire created if nothing but the lock was written
        in them (a run that failed before its first file)."""
        if not self._created or any(p.name != LOCK for p in self.path.iterdir()):
            return
        self.release()
        (self.path / LOCK).unlink(missing_ok=True)
        _remove_created(self._created)
        self._created = []

    def discard(self, names: tuple[str, ...]) -> None:
        """Remove the files ``names`` this run wrote, then the folders it created if
        nothing else is left in them (a fresh run that could not keep anything)."""
        for name in names:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError:
                return  # the folder cannot be changed: leave it as it is
        self.discard_if_unused()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        self.release()


def _checked_path(path: str | os.PathLike, flag: str) -> Path:
    text = os.fspath(path)
    if not isinstance(text, str) or not text.strip():
        raise RunFolderError(f"the run folder ({flag}) is empty; give a folder name")
    if "\0" in text:
        raise RunFolderError(f"the run folder ({flag}) contains a NUL character")
    path = Path(text).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"run folder {path} is a file, not a folder; choose another "
                                 f"{flag}")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise RunFolderError(
                        f"run folder {path} would lie below {parent}, which is a file; choose "
                        f"another {flag}")
                break
    except OSError as err:  # e.g. a name too long to even look up
        raise RunFolderError(f"cannot use run folder {path} ({_os_reason(err)}); choose another "
                             f"{flag}") from None
    return path


def _make_folder(path: Path, flag: str) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first)."""
    missing = [p for p in (*reversed(path.parents), path) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_created([p for p in missing if p.exists()])
        raise RunFolderError(
            f"cannot create run folder {path} ({_os_reason(err)}); choose another {flag}"
        ) from None
    return missing


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or gone: leave it


def _lock_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
