"""Where a command will write, checked before it does any work.

Every output a user names (a JSON file, a folder of plots, a reproduction's folder) is
checked when the command starts: not empty, not too long a name, not a folder where a
file goes (or a file where a folder goes), not below a file, and writable. A failure is
one ConfigError naming the flag, the path and the fix; nothing has been made or changed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConfigError

MAX_NAME = 255  # bytes of one path component (NAME_MAX on Linux)
MAX_PATH = 4096  # bytes of a whole path (PATH_MAX)


def checked_text(text: object, flag: str) -> Path:
    """``text`` as a path: a non-empty string without NUL whose parts fit the system's
    name limits."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{flag} is empty; give a path")
    if "\0" in text:
        raise ConfigError(f"{flag} contains a NUL character; give a plain path")
    raw = os.fsencode(text)
    if len(raw) > MAX_PATH:
        raise ConfigError(f"{flag} is {len(raw)} bytes long, more than the {MAX_PATH} a path "
                          "may have; give a shorter path")
    long = next((p for p in Path(text).parts if len(os.fsencode(p)) > MAX_NAME), None)
    if long is not None:
        raise ConfigError(f"{flag}: the name {long[:40]}... is {len(os.fsencode(long))} bytes "
                          f"long, more than the {MAX_NAME} a name may have; shorten it")
    return Path(text).expanduser()


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(".")


def _writable_folder(folder: Path, flag: str, what: str) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{flag}: {what} would lie below {folder}, which is a file; "
                          "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write in {folder} (no permission); choose a "
                          "folder you can write to")
    # the permission bits do not tell everything (root in /sys or /proc, a read-only
    # mount): create and remove a file there, so the command fails now, not after its work
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sigprop-write-check-")
    except OSError as err:
        raise ConfigError(f"{flag}: cannot create files in {folder} ({err.strerror or err}); "
                          "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(text: object, flag: str) -> Path:
    """A file the command will write: its folder exists and is writable, and the path is
    not a folder. Returns the path."""
    path = checked_text(text, flag)
    try:
        if path.is_dir():
            raise ConfigError(f"{flag} {path} is a folder; give a file name (e.g. "
                              f"{path / 'results.json'})")
        parent = path.parent
        if not parent.exists():
            near = _nearest_existing(parent)
            if not near.is_dir():
                raise ConfigError(f"{flag} {path} would lie below {near}, which is a file; "
                                  "choose another path")
            raise ConfigError(f"{flag} {path}: its folder {parent} does not exist; create it "
                              "or choose another path")
        _writable_folder(parent, flag, str(path))
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"{flag} {path} is not writable (no permission); choose "
                              "another path")
    except OSError as err:
        raise ConfigError(f"cannot use {flag} {path} ({err.strerror or err}); choose another "
                          "path") from None
    return path


def check_output_folder(text: object, flag: str) -> Path:
    """A folder the command will create if missing and write into: not a file, not below
    a file, and the nearest existing folder writable. Returns the path."""
    path = checked_text(text, flag)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a folder; choose another path")
        _writable_folder(_nearest_existing(path), flag, str(path))
    except OSError as err:
        raise ConfigError(f"cannot use {flag} {path} ({err.strerror or err}); choose another "
                          "path") from None
    return path
