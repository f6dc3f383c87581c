"""Downloading a dataset's official files, bounded in time, published atomically.

Before any network access the destination is checked (created, writable, no folder where a
file goes). Each file streams to ``FILE.part`` and is published under its name only with the
official md5; the ``.part`` is removed on every way out (errors, Ctrl-C, SystemExit), and so
are the folders the call made, unless a file verified before the failure is in them. Two
limits, in seconds, bound a download: ``stall_timeout`` (no byte for that long ends it; also
the socket timeout) and ``deadline`` (for a whole :func:`download_dataset` call, checked
between chunks). Each failure is one DataError line saying which limit was hit and how to
raise it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import math
import numbers
import os
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from ..errors import ConfigError, DataError
from .datasets import cache_root, file_md5
from .formats import os_reason, shown
from .paths import given_root, not_a_file, not_a_folder, path_kind
from .specs import dataset_spec

DEFAULT_STALL_TIMEOUT = 30.0  # seconds without a byte before a download gives up
DEFAULT_DEADLINE = 3600.0  # seconds for a whole download_dataset call

# (url, socket timeout in seconds) -> a response with .read (and ideally .read1)
Opener = Callable[[str, float], BinaryIO]


def _default_opener(url: str, timeout: float) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=timeout)


# Swappable for tests; download_dataset(opener=...) overrides it per call.
URL_OPENER: Opener = _default_opener

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


def _writable_dir(folder: Path, created: list[Path], what: str = "download folder") -> None:
    """Create ``folder`` if needed and prove it writable (a temp file made and removed),
    before any network access; root ignores permission bits, so this really writes. The
    folders it makes are added to ``created``, deepest first, for :func:`_remove_created`."""
    fix = "choose another --dest (dest_dir=)"
    kind = path_kind(folder, what, fix)
    if kind == "missing":
        missing = [folder]
        for parent in folder.parents:
            if path_kind(parent, what, fix) != "missing":
                break
            missing.append(parent)
        try:
            for d in reversed(missing):  # outermost first, each recorded once made
                d.mkdir(exist_ok=True)
                created.insert(0, d)
        except (OSError, ValueError) as e:
            raise DataError(f"{what} {shown(folder)} cannot be created ({os_reason(e)}); "
                            f"{fix}") from None
    elif kind != "dir":
        raise DataError(f"{what} {shown(folder)} {not_a_folder(folder, kind)}; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sigprop-write-check-", dir=folder)
    except OSError as e:
        raise DataError(f"{what} {shown(folder)} is not writable ({os_reason(e)}); "
                        f"{fix}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _remove_created(created: list[Path]) -> None:
    """Remove the folders a failed download made, deepest first; only empty ones go
    (``rmdir``), so files verified before the failure stay, with their folder."""
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()


def _check_dest_file(dest: Path) -> None:
    """``dest`` and its ``.part`` must be absent or regular files (never a folder)."""
    for path in (dest, _part(dest)):
        kind = path_kind(path, "download target", "choose another --dest (dest_dir=)")
        if kind not in ("missing", "file"):
            raise DataError(f"{not_a_file(shown(path), kind)}, so the download cannot be "
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
    network is touched; every failure is one DataError line, and leaves no ``.part`` and
    no folder it made.
    """
    stall, limit = _seconds(stall_timeout, "stall_timeout"), _seconds(deadline, "deadline")
    dest = Path(dest)
    created: list[Path] = []
    try:
        _writable_dir(dest.parent, created)
        _check_dest_file(dest)
        return _fetch(url, dest, md5, progress, opener or URL_OPENER, stall, _Deadline(limit))
    except BaseException:  # Ctrl-C and SystemExit too: no empty folder is left behind
        _remove_created(created)
        raise


def download_dataset(name: str, dest_dir: Path | str | None = None, progress: bool = True, *,
                     include_optional: bool = False, opener: Opener | None = None,
                     stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                     deadline: float = DEFAULT_DEADLINE) -> Path:
    """Download dataset ``name``'s files into ``dest_dir/<name>`` and return that folder.

    ``dest_dir`` defaults to the user cache root; a ``dest_dir`` already named ``<name>``
    is used as is. Before any network access the folder is created and proved writable,
    and no file to download may be a folder there: else one DataError line. A call that
    fails removes the folders it made, unless a file it verified is in them. Files already
    present with the right md5 are skipped. ``include_optional`` also fetches optional
    files (SVHN ``extra``, 1.3 GB). ``stall_timeout`` (seconds without a byte, default 30)
    and ``deadline`` (seconds for this whole call, default 3600) bound the time; both must
    be positive and finite (else ConfigError). ``opener(url, timeout)`` replaces
    ``URL_OPENER``.
    """
    stall, limit = _seconds(stall_timeout, "stall_timeout"), _seconds(deadline, "deadline")
    clock = _Deadline(limit)
    spec = dataset_spec(name)
    root = given_root(dest_dir, "dest_dir") if dest_dir is not None else cache_root()
    folder = root if root.name == name else root / name
    created: list[Path] = []
    try:
        _writable_dir(folder, created)
        wanted = [f for f in spec.files if include_optional or not f.optional]
        for f in wanted:
            _check_dest_file(folder / f.name)
        for f in wanted:
            dest = folder / f.name
            if path_kind(dest) == "file" and file_md5(dest) == f.md5:
                continue
            _fetch(f.url, dest, f.md5, progress, opener or URL_OPENER, stall, clock)
    except BaseException:  # Ctrl-C and SystemExit too: no empty folder is left behind
        _remove_created(created)
        raise
    return folder
