"""Shared fixtures: a tiny learnable fake Fashion-MNIST, isolated dataset lookup roots,
float64 within a test, an empty working folder, and one finished CLI run. The plain
helpers they use, and the tests share, are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import FAST, write_fake_fashion

import sigprop.data.datasets as ds
from sigprop.cli import main

# Tests run single-threaded. On a busy 2-core machine OpenMP's thread barriers make
# every op wait on a descheduled thread (measured: 200 ms instead of 3 ms per step of
# a 2x32 net; the 8-epoch fc-3x1000 run of test_e2e.py took 122 s with 2 threads next
# to another job, 16 s with 1). Tiny networks gain nothing from threads anyway.
# SIGPROP_TEST_THREADS=2 runs the suite with 2 intra-op threads (another summation
# order: every result must hold either way).
torch.set_num_threads(int(os.environ.get("SIGPROP_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory) -> Path:
    """The ``fashion-mnist`` folder of a tiny learnable fake dataset (shared, read-only)."""
    return write_fake_fashion(tmp_path_factory.mktemp("fakedata"))


def _isolate(monkeypatch, system: Path, cache: Path) -> None:
    """Dataset lookup sees only ``system`` and ``cache`` as default places; $SIGPROP_DATA unset."""
    monkeypatch.setattr(ds, "SYSTEM_ROOT", system)
    monkeypatch.setattr(ds, "CACHE_ROOT", cache)
    monkeypatch.delenv(ds.ENV_VAR, raising=False)


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """No real dataset is visible: system/cache roots are empty folders, $SIGPROP_DATA unset."""
    _isolate(monkeypatch, tmp_path / "no-system", tmp_path / "no-cache")
    return tmp_path


@pytest.fixture
def isolated_roots(tmp_path, monkeypatch):
    """Point the system and cache roots at empty temp folders and clear $SIGPROP_DATA."""
    system, cache = tmp_path / "system", tmp_path / "cache"
    _isolate(monkeypatch, system, cache)
    return system, cache


@pytest.fixture
def roots(isolated_roots):
    """A complete dataset in the system root, so any fallback to it would be visible."""
    return write_fake_fashion(isolated_roots[0])


@pytest.fixture
def float64():
    """float64 as the default dtype within a test (exact comparisons of update paths)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, isolated_data):
    """The test runs from an empty folder (returned), with no real dataset visible."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def finished(fake_fashion, in_tmp, capsys):
    """The run folder of a finished 2-epoch CLI training on the fake data."""
    run = in_tmp / "run"
    assert main(["train", "--data-dir", str(fake_fashion), "--epochs", "2", "--run-dir",
                 str(run), "--train-limit", "256", *FAST]) == 0
    capsys.readouterr()
    return run
