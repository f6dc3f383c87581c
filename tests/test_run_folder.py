"""A run folder through the command line: it holds one training at a time (a lock the
OS drops with the process), an unusable one is one line before any data is read, and a
fresh run that fails leaves no folder behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import FAST, SRC, one_error_line, snapshot

from sigprop.cli import main

pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    from sigprop.engine.runfolder import RunFolder
    held = RunFolder.acquire({run!r})
    print("held", flush=True)
    time.sleep(60)
""")


def test_two_trainings_into_one_folder(fake_fashion, in_tmp, capsys):
    run = in_tmp / "shared"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(src=SRC, run=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(capsys, main(["train", "--data-dir", str(fake_fashion),
                                            "--run-dir", str(run), "--epochs", "1", *FAST]))
        assert "in use by another training run" in line and f"pid {holder.pid}" in line
        assert snapshot(run) == {}
    finally:
        holder.kill()  # killed, not released: the OS drops the lock
        holder.wait()
    assert main(["train", "--data-dir", str(fake_fashion), "--run-dir", str(run),
                 "--epochs", "1", "--train-limit", "128", *FAST]) == 0


@pytest.mark.parametrize("case", ["a file", "below a file", "too long", "empty", "spaces",
                                  "cannot be created"])
def test_bad_run_dir_is_one_line_before_data(in_tmp, capsys, case, monkeypatch):
    (in_tmp / "f").write_text("x")
    run_dir = {"a file": "f", "below a file": "f/run", "too long": "x" * 300, "empty": "",
               "spaces": "  ", "cannot be created": "/proc/sigprop-run"}[case]
    read = []
    from sigprop.engine import trainer

    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: read.append(a) or 1 / 0)
    one_error_line(capsys, main(["train", "--run-dir", run_dir, *FAST]))
    assert read == []  # checked before any data is loaded
    assert sorted(p.name for p in in_tmp.iterdir()) == ["f"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to run a child as another user")
def test_unwritable_run_dir_is_one_line():
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="sigprop-ro-"))  # pytest's tmp is private (0700)
    try:
        base.chmod(0o755)
        locked = base / "ro"
        locked.mkdir(mode=0o555)
        code = (f"import sys; sys.path.insert(0, {SRC!r}); from sigprop.cli import main; "
                f"sys.exit(main(['train', '--run-dir', {str(locked / 'run')!r}, "
                "'--no-progress']))")
        try:
            out = subprocess.run([sys.executable, "-c", code], user="nobody",
                                 capture_output=True, check=False, text=True, timeout=120,
                                 env={**os.environ, "HOME": str(base)})
        except PermissionError:
            pytest.skip("this Python is not executable by another user here")
        if "No module named" in out.stderr or "Permission denied: '/root" in out.stderr:
            pytest.skip("the package is not importable as another user here")
        assert out.returncode == 2, out.stderr
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and "cannot create run folder" in lines[0], out.stderr
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_run_dir_without_write_permission(in_tmp, capsys, monkeypatch):
    """The lock file cannot be created (EACCES, as for a non-root user in a 0555
    folder; root bypasses permission bits, so the refusal is simulated)."""
    from sigprop.engine import runfolder

    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith(runfolder.LOCK):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(runfolder.os, "open", denied)
    (in_tmp / "ro").mkdir()
    line = one_error_line(capsys, main(["train", "--run-dir", "ro", *FAST]))
    assert "run folder ro is not writable (Permission denied)" in line
    line = one_error_line(capsys, main(["train", "--run-dir", "new/run", *FAST]))
    assert "not writable" in line and not (in_tmp / "new").exists()


def test_failed_fresh_run_leaves_no_folder(in_tmp, capsys):
    # no data visible: the run fails after taking its folder, which it then removes
    one_error_line(capsys, main(["train", "--run-dir", "deep/er/run", *FAST]))
    assert not (in_tmp / "deep").exists()
