"""Downloads: md5-checked and published atomically, bounded by the stall timeout and the
deadline, the destination checked before the network, no ``.part`` left on any way out.
Servers are real sockets on 127.0.0.1 with sub-second timeouts."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import make_idx_dataset, md5, one_error_line, one_line, use_spec

import sigprop.data.download as dl
from sigprop.cli import main
from sigprop.data import dataset_spec, download_dataset, download_file, load_dataset
from sigprop.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


# --------------------------------------------------------------------------- files and datasets


def test_download_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "file.bin"
    download_file(src.as_uri(), dest, md5(src.read_bytes()), progress=False)
    assert dest.read_bytes() == src.read_bytes()
    assert list(dest.parent.iterdir()) == [dest]  # no .part left


def test_download_file_bad_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(DataError, match="md5"):
        download_file(src.as_uri(), dest, "0" * 32, progress=False)
    assert not dest.parent.exists()  # nothing it made is left: no .part, no folder


def test_download_file_network_error(tmp_path):
    def opener(url, timeout):
        raise urllib.error.URLError("no route to host")

    with pytest.raises(DataError, match="no route to host"):
        download_file("http://x/y", tmp_path / "y", "0" * 32, opener=opener, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Fake fashion-mnist server: files in served/, a spec whose md5s match them."""
    root = tmp_path / "served"
    make_idx_dataset(root)
    spec = dataset_spec("fashion-mnist")
    files = tuple(
        dataclasses.replace(f, md5=md5((root / f.name).read_bytes())) for f in spec.files
    )
    use_spec(monkeypatch, dataclasses.replace(spec, files=files))
    calls: list[str] = []

    def opener(url: str, timeout: float):
        assert timeout == dl.DEFAULT_STALL_TIMEOUT  # the stall timeout is the socket timeout
        calls.append(url)
        return open(root / url.rsplit("/", 1)[1], "rb")

    return opener, calls


def test_download_dataset(tmp_path, served, isolated_roots):
    opener, calls = served
    folder = download_dataset("fashion-mnist", progress=False, opener=opener)
    assert folder == isolated_roots[1] / "fashion-mnist"  # default: the cache
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f.name for f in dataset_spec("fashion-mnist").files
    )
    assert calls[0].startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
    assert load_dataset("fashion-mnist", "train")[0].shape == (6, 1, 28, 28)
    n = len(calls)
    download_dataset("fashion-mnist", progress=False, opener=opener)
    assert len(calls) == n  # present with the right md5: skipped


def test_download_dataset_dest_dir(tmp_path, served):
    opener, _ = served
    assert download_dataset("fashion-mnist", tmp_path / "d", False, opener=opener) == (
        tmp_path / "d" / "fashion-mnist"
    )
    assert download_dataset("fashion-mnist", tmp_path / "d" / "fashion-mnist", False,
                            opener=opener) == tmp_path / "d" / "fashion-mnist"


def test_download_dataset_bad_md5(tmp_path):
    def opener(url, timeout):
        return io.BytesIO(b"not the real file")

    dest = tmp_path / "d"
    with pytest.raises(DataError, match=r"expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        download_dataset("fashion-mnist", dest, progress=False, opener=opener)
    assert not any(p.is_file() for p in dest.rglob("*"))


# --------------------------------------------------------------------------- local servers


@contextlib.contextmanager
def tcp_server(handle: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A threaded server on 127.0.0.1; ``handle(conn, stop)`` serves each connection.
    Yields the base URL; on exit every thread is told to stop, sockets close, threads join."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    workers: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            handle(conn, stop)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=serve, args=(conn,), daemon=True)
            t.start()
            workers.append(t)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/file.bin"
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for t in workers:
            t.join(5)


def _read_request(conn: socket.socket, stop: threading.Event) -> None:
    conn.settimeout(0.1)
    data = b""
    while b"\r\n\r\n" not in data and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accepts, reads the request, never answers."""
    _read_request(conn, stop)
    stop.wait(10)


def dripping(conn: socket.socket, stop: threading.Event) -> None:
    """Answers 200 with 1,000 bytes, one every 0.2 s."""
    _read_request(conn, stop)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        if stop.wait(0.2):
            return
        conn.sendall(b"x")


def serving(payload: bytes, cut: int | None = None):
    """Answers 200 with ``payload`` (only its first ``cut`` bytes, then closes)."""
    def handle(conn: socket.socket, stop: threading.Event) -> None:
        _read_request(conn, stop)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(payload) + payload[:cut])
    return handle


def no_part_left(folder: Path) -> None:
    assert not [p for p in folder.rglob("*.part") if p.is_file()]
    assert not list(folder.rglob(".sigprop-write-check-*"))


def test_download_over_local_http(tmp_path):
    payload = os.urandom(300_000)
    with tcp_server(serving(payload)) as url:
        dest = download_file(url, tmp_path / "out" / "f.bin", md5(payload), progress=False,
                             stall_timeout=2, deadline=10)
    assert dest.read_bytes() == payload
    no_part_left(tmp_path)


def test_silent_server_stalls(tmp_path):
    with tcp_server(silent) as url:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"stalled: no data for 0\.5 s.*--stall-timeout") as err:
            download_file(url, tmp_path / "f.bin", "0" * 32, progress=False, stall_timeout=0.5)
        assert time.monotonic() - start < 3
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_silent_server_hits_a_nearer_deadline(tmp_path):
    with tcp_server(silent) as url:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"deadline of 0\.5 s.*--deadline") as err:
            download_file(url, tmp_path / "f.bin", "0" * 32, progress=False, stall_timeout=30,
                          deadline=0.5)
        assert time.monotonic() - start < 3
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_dripping_server_hits_the_deadline(tmp_path):
    with tcp_server(dripping) as url:
        start = time.monotonic()
        with pytest.raises(DataError, match=r"did not finish within the deadline of 1 s.*"
                           r"--deadline SECONDS") as err:
            download_file(url, tmp_path / "f.bin", "0" * 32, progress=False, stall_timeout=1,
                          deadline=1)
        assert time.monotonic() - start < 3
    one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_connection_closed_early(tmp_path):
    payload = b"y" * 5000
    with tcp_server(serving(payload, cut=100)) as url, \
            pytest.raises(DataError, match=r"ended after 100 of 5000 bytes|downloading") as err:
        download_file(url, tmp_path / "f.bin", md5(payload), progress=False, stall_timeout=1)
    print(one_line(err))
    assert list(tmp_path.iterdir()) == []


class _Server:
    """A local TCP server on 127.0.0.1 that ``behave(conn)`` answers; bounded, closed at
    the end of the test."""

    def __init__(self, behave) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.stop = threading.Event()
        self.behave = behave
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/file.gz"

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            self.behave(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=10)


def _never_answers(conn, stop) -> None:
    stop.wait(10)


def _drips(conn, stop) -> None:
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(100):  # one byte every 0.2 s: never a stall, never the end
        if stop.wait(0.2):
            return
        try:
            conn.sendall(b"x")
        except OSError:
            return


@pytest.mark.parametrize("behave,limit,match", [
    (_never_answers, "stall", "stalled: no data for 1 s"),
    (_drips, "deadline", "deadline of 1 s"),
])
def test_download_ends_within_its_limits(tmp_path, behave, limit, match):
    server = _Server(behave)
    try:
        t0 = time.monotonic()
        kw = {"stall_timeout": 1.0, "deadline": 60.0} if limit == "stall" else \
            {"stall_timeout": 5.0, "deadline": 1.0}
        with pytest.raises(DataError, match=match):
            dl.download_file(server.url, tmp_path / "file.gz", "0" * 32, progress=False,
                             opener=dl._default_opener, **kw)
        assert time.monotonic() - t0 < 8
    finally:
        server.close()
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "file.gz").exists()


# --------------------------------------------------------------------------- time limits


@pytest.fixture
def fake_remote(monkeypatch):
    """fashion-mnist whose official files are ``b"file N"`` (md5s to match), served by an
    opener that records (url, timeout) and can be told to sleep per file."""
    spec = dataset_spec("fashion-mnist")
    payloads = {f.name: f"file {i}".encode() * 100 for i, f in enumerate(spec.files)}
    files = tuple(dataclasses.replace(f, md5=md5(payloads[f.name])) for f in spec.files)
    use_spec(monkeypatch, dataclasses.replace(spec, files=files))
    calls: list[tuple[str, float]] = []
    state = {"sleep": 0.0}

    def opener(url: str, timeout: float):
        calls.append((url, timeout))
        time.sleep(state["sleep"])
        return io.BytesIO(payloads[url.rsplit("/", 1)[1]])

    return opener, calls, state


def test_opener_gets_the_timeout(tmp_path, fake_remote):
    opener, calls, _ = fake_remote
    download_dataset("fashion-mnist", tmp_path, False, opener=opener, stall_timeout=7)
    assert len(calls) == 4 and {t for _, t in calls} == {7.0}
    calls.clear()
    download_dataset("fashion-mnist", tmp_path / "b", False, opener=opener, stall_timeout=7,
                     deadline=3)
    assert all(0 < t <= 3 for _, t in calls)  # the deadline is nearer than the stall


def test_deadline_covers_the_whole_call(tmp_path, fake_remote):
    opener, calls, state = fake_remote
    state["sleep"] = 0.3
    with pytest.raises(DataError, match=r"deadline of 0\.5 s") as err:
        download_dataset("fashion-mnist", tmp_path, False, opener=opener, deadline=0.5)
    one_line(err)
    assert 1 <= len(calls) < 4
    folder = tmp_path / "fashion-mnist"
    assert 1 <= len(list(folder.iterdir())) < 4  # verified files stay, nothing half-written
    no_part_left(tmp_path)


BAD_SECONDS = [0, -1, 0.0, float("nan"), float("inf"), -float("inf"), "5", None, True]


@pytest.mark.parametrize("key", ["stall_timeout", "deadline"])
@pytest.mark.parametrize("value", BAD_SECONDS)
def test_bad_time_limits_are_config_errors(tmp_path, fake_remote, key, value):
    opener, calls, _ = fake_remote
    with pytest.raises(ConfigError, match=rf"{key} must be a positive, finite number") as err:
        download_dataset("fashion-mnist", tmp_path / "d", False, opener=opener, **{key: value})
    one_line(err)
    with pytest.raises(ConfigError, match=key):
        download_file("http://x/y", tmp_path / "e" / "y", "0" * 32, opener=opener,
                      **{key: value})
    assert calls == [] and list(tmp_path.iterdir()) == []  # nothing touched


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "30", True])
@pytest.mark.parametrize("key", ["stall_timeout", "deadline"])
def test_download_limits_must_be_positive_seconds(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key):
        dl.download_file("http://127.0.0.1:9/x", tmp_path / "x", "0" * 32, **{key: value})


# --------------------------------------------------------------------------- interrupts


class _Interrupting(io.BytesIO):
    def __init__(self, exc: BaseException):
        super().__init__(b"z" * 10_000)
        self.exc, self.reads = exc, 0

    def read1(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:  # after a chunk is written to the .part
            raise self.exc
        return super().read1(100)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(143), MemoryError()])
def test_interrupted_download_leaves_no_part(tmp_path, fake_remote, exc):
    def opener(url, timeout):
        return _Interrupting(exc)

    with pytest.raises(type(exc)):
        download_file("http://x/f.bin", tmp_path / "f.bin", "0" * 32, progress=False,
                      opener=opener)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(type(exc)):
        download_dataset("fashion-mnist", tmp_path / "d", False, opener=opener)
    no_part_left(tmp_path)
    assert not (tmp_path / "d").exists()  # the folders it made went with the .part


def test_interrupt_while_connecting_leaves_no_part(tmp_path):
    def opener(url, timeout):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_file("http://x/f.bin", tmp_path / "f.bin", "0" * 32, opener=opener)
    assert list(tmp_path.iterdir()) == []


class _Breaks:
    """A response whose second read raises ``exc`` (Ctrl-C, or SIGTERM as SystemExit)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.reads, self.headers = exc, 0, {}

    def read1(self, n: int) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise self.exc
        return b"partial"

    def __enter__(self):
        return self

    def __exit__(self, *a) -> None:
        pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(143)])
def test_interrupted_read1_only_response_leaves_no_part(tmp_path, exc):
    with pytest.raises(type(exc)):
        dl.download_file("http://127.0.0.1:9/x", tmp_path / "x.gz", "0" * 32, progress=False,
                         opener=lambda url, timeout: _Breaks(exc))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- destination


def _dest_is_file(t: Path) -> Path:
    (t / "dest").write_text("x")
    return t / "dest"


def _dest_below_file(t: Path) -> Path:
    return _dest_is_file(t) / "sub" / "dir"


def _target_is_directory(t: Path) -> Path:
    (t / "dest" / "fashion-mnist" / "train-images-idx3-ubyte.gz").mkdir(parents=True)
    return t / "dest"


def _part_is_directory(t: Path) -> Path:
    (t / "dest" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz.part").mkdir(parents=True)
    return t / "dest"


BAD_DESTS = [
    pytest.param(_dest_is_file, r"dest is a file, not a folder", id="dest-is-file"),
    pytest.param(_dest_below_file, r"does not exist \(.*dest is a file, not a folder\)",
                 id="below-a-file"),
    pytest.param(_target_is_directory, r"train-images-idx3-ubyte\.gz is a directory, not a file",
                 id="target-is-directory"),
    pytest.param(_part_is_directory, r"\.part is a directory, not a file", id="part-is-directory"),
    pytest.param(lambda t: t / ("a" * 5000), r"cannot be used \(File name too long\)",
                 id="name-too-long"),
]


@pytest.mark.parametrize("make, expected", BAD_DESTS)
def test_bad_dest_fails_before_the_network(tmp_path, fake_remote, make, expected):
    opener, calls, _ = fake_remote
    dest = make(tmp_path)
    with pytest.raises(DataError, match=expected) as err:
        download_dataset("fashion-mnist", dest, False, opener=opener)
    assert "--dest" in one_line(err)
    assert calls == []
    no_part_left(tmp_path)


def test_download_file_bad_dest_before_the_network(tmp_path):
    calls = []

    def opener(url, timeout):
        calls.append(url)
        return io.BytesIO(b"")

    _dest_is_file(tmp_path)
    with pytest.raises(DataError, match="is a file, not a folder") as err:
        download_file("http://x/y", tmp_path / "dest" / "y", "0" * 32, opener=opener)
    one_line(err)
    assert calls == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores permission bits (below-a-file covers unwritable)")
def test_unwritable_dest(tmp_path, fake_remote):
    opener, calls, _ = fake_remote
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataError, match="not writable|cannot be created") as err:
            download_dataset("fashion-mnist", locked, False, opener=opener)
        one_line(err)
    finally:
        locked.chmod(0o700)
    assert calls == []


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_dest_is_a_config_error(fake_remote, value):
    opener, calls, _ = fake_remote
    with pytest.raises(ConfigError, match="dest_dir is empty"):
        download_dataset("fashion-mnist", value, False, opener=opener)
    assert calls == []


def test_download_creates_dest_and_loads(tmp_path, fake_remote):
    opener, calls, _ = fake_remote
    folder = download_dataset("fashion-mnist", tmp_path / "new" / "deep", False, opener=opener)
    assert folder == tmp_path / "new" / "deep" / "fashion-mnist" and len(calls) == 4
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f.name for f in dataset_spec("fashion-mnist").files)
    download_dataset("fashion-mnist", folder, False, opener=opener)
    assert len(calls) == 4  # verified files are skipped


def test_download_dest_checked_before_the_network(tmp_path):
    (tmp_path / "f").write_text("x")
    calls = []
    for dest in (tmp_path / "f", tmp_path / "f" / "below"):
        with pytest.raises(DataError):
            dl.download_dataset("mnist", dest, progress=False,
                                opener=lambda url, timeout: calls.append(url))
    assert calls == []


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("dest", ["a-file", "a-file/below"])
def test_download_dest_at_a_file(in_tmp, capsys, dest, monkeypatch):
    import sigprop.data.download as ds

    (in_tmp / "a-file").write_text("x")
    calls = []
    monkeypatch.setattr(ds, "URL_OPENER", lambda *a, **k: calls.append(a) or 1 / 0)
    one_error_line(capsys, main(["data", "download", "mnist", "--dest", dest]))
    assert calls == []  # refused before any network access


@pytest.mark.usefixtures("in_tmp")
@pytest.mark.parametrize("flag", ["--stall-timeout", "--deadline"])
@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_download_limits_validated(capsys, flag, value):
    line = one_error_line(capsys, main(["data", "download", "mnist", flag, value]))
    assert flag in line


# --------------------------------------------------------------------------- what a failure leaves


def _unreachable(url, timeout):
    raise urllib.error.URLError("Name or service not known")


def test_failed_download_removes_the_folders_it_made(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(dl, "URL_OPENER", _unreachable)
    one_error_line(capsys, main(["data", "download", "mnist", "--dest", "dl"]))
    assert list(in_tmp.iterdir()) == []  # neither dl/ nor dl/mnist/
    (in_tmp / "mine").mkdir()
    (in_tmp / "mine" / "notes.txt").write_text("x")
    one_error_line(capsys, main(["data", "download", "mnist", "--dest", "mine/a/b"]))
    assert [p.name for p in (in_tmp / "mine").iterdir()] == ["notes.txt"]  # only what it made
    (in_tmp / "empty").mkdir()
    with pytest.raises(DataError):
        download_file("http://x/y", in_tmp / "empty" / "y", "0" * 32, opener=_unreachable)
    assert (in_tmp / "empty").is_dir()  # there before: kept


def test_failed_download_keeps_verified_files_and_their_folder(tmp_path, fake_remote):
    opener, calls, _ = fake_remote

    def fails_on_the_third(url, timeout):
        if len(calls) == 2:
            raise urllib.error.URLError("connection reset")
        return opener(url, timeout)

    with pytest.raises(DataError, match="connection reset"):
        download_dataset("fashion-mnist", tmp_path / "new", False, opener=fails_on_the_third)
    assert len(list((tmp_path / "new" / "fashion-mnist").iterdir())) == 2  # verified: kept
