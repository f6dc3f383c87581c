"""What is at a path, and why it cannot serve as a dataset folder or file, as one line.

Every probe of a user-given path is guarded: a path the system cannot even look up (too
long, a NUL byte, no permission) is a one-line DataError, never a traceback.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import ConfigError, DataError
from .formats import os_reason, shown


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


def path_kind(path: Path, what: str = "path", fix: str = "") -> str:
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


def not_a_folder(path: Path, kind: str) -> str:
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


def not_a_file(name: str, kind: str) -> str:
    """Why ``name`` (of ``kind``, not "file" or "missing") cannot be read as a data file."""
    if kind == "dir":
        return f"{name} is a directory, not a file"
    if kind == "broken-link":
        return f"{name} is a broken symbolic link"
    return f"{name} is not a regular file"


def given_root(value: object, origin: str) -> Path:
    """The folder a user named (``data_dir``, ``$SIGPROP_DATA``, ``dest_dir``), ``~`` expanded."""
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
