"""Where a dataset is read from: an explicit data_dir or $SIGPROP_DATA is the only place
looked at (never a silent fallback), else the first complete default place; every
unusable location is one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import (
    FAST,
    make_cifar10,
    make_idx_dataset,
    make_mnist,
    make_svhn,
    one_error_line,
    one_line,
)

import sigprop.data.datasets as ds
from sigprop.cli import main
from sigprop.data import find_dataset_dir, load_dataset, split_file_records
from sigprop.errors import ConfigError, DataError
from sigprop.registry import DATASETS

pytestmark = pytest.mark.usefixtures("isolated_data")  # no real dataset is visible


# --------------------------------------------------------------------------- default places


def test_missing_dataset_lists_places(tmp_path, monkeypatch, isolated_roots):
    system, cache = isolated_roots
    # Neither data_dir nor $SIGPROP_DATA: the default places are listed.
    with pytest.raises(DataError) as err:
        find_dataset_dir("fashion-mnist")
    msg = str(err.value)
    assert "\n" not in msg
    for place in (system / "fashion-mnist", cache / "fashion-mnist"):
        assert str(place) in msg
    assert "sigprop data download fashion-mnist" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    with pytest.raises(DataError, match="sigprop data download cifar10") as err:
        load_dataset("cifar10", "train")
    assert "apt-get" not in str(err.value)
    # An explicit folder is the only place looked at: its error names it, not the others.
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "envdir"))
    with pytest.raises(DataError) as err:
        find_dataset_dir("fashion-mnist", tmp_path / "given")
    msg = str(err.value)
    assert f"data_dir folder {tmp_path / 'given'} does not exist" in msg
    assert "envdir" not in msg and str(system) not in msg
    with pytest.raises(DataError, match=r"\$SIGPROP_DATA folder .*envdir does not exist"):
        find_dataset_dir("fashion-mnist")


def test_lookup_order(tmp_path, monkeypatch, isolated_roots):
    system, cache = isolated_roots
    given, env = tmp_path / "given", tmp_path / "env"
    for folder in (given / "mnist", env / "mnist", system / "mnist", cache / "mnist"):
        make_idx_dataset(folder, n=1)
    monkeypatch.setenv(ds.ENV_VAR, str(env))
    assert find_dataset_dir("mnist", given) == given / "mnist"  # parent holding mnist/
    assert find_dataset_dir("mnist", given / "mnist") == given / "mnist"  # folder itself
    assert find_dataset_dir("mnist") == env / "mnist"
    monkeypatch.setenv(ds.ENV_VAR, "")  # set but empty: as if unset
    assert find_dataset_dir("mnist") == system / "mnist"
    monkeypatch.delenv(ds.ENV_VAR)
    assert find_dataset_dir("mnist") == system / "mnist"
    for f in (system / "mnist").iterdir():
        f.unlink()
    assert find_dataset_dir("mnist") == cache / "mnist"


def test_incomplete_folder_is_skipped(isolated_roots):
    system, cache = isolated_roots
    make_idx_dataset(system / "mnist")
    make_idx_dataset(cache / "mnist")
    (system / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_dataset_dir("mnist") == cache / "mnist"


def test_xdg_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(ds, "CACHE_ROOT", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ds.cache_root() == tmp_path / "xdg" / "sigprop"


def test_default_chain_when_nothing_given(roots):
    assert find_dataset_dir("fashion-mnist") == roots


# --------------------------------------------------------------------------- explicit location


def _missing_file(d: Path) -> Path:
    make_mnist(d / "mnist")
    (d / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    return d


def _file_is_directory(d: Path) -> Path:
    make_mnist(d / "mnist")
    (d / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    (d / "mnist" / "t10k-images-idx3-ubyte.gz").mkdir()
    return d


def _a_file(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("x")
    return d / "notes.txt"


def _below_a_file(d: Path) -> Path:
    return _a_file(d) / "mnist"


def _broken_link(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "link").symlink_to(d / "gone")
    return d / "link"


def _empty_folder(d: Path) -> Path:
    d.mkdir(parents=True)
    return d


BAD_LOCATIONS = [
    # (make the bad location under a temp folder, what the message must say)
    pytest.param(_missing_file, r"lacks train-labels-idx1-ubyte\.gz \(or uncompressed\)",
                 id="missing-one-file"),
    pytest.param(lambda d: d / "does-not-exist", r"does-not-exist does not exist", id="absent"),
    pytest.param(_a_file, r"notes\.txt is a file, not a folder", id="file-not-folder"),
    pytest.param(_below_a_file, r"does not exist \(.*notes\.txt is a file, not a folder\)",
                 id="below-a-file"),
    pytest.param(_file_is_directory, r"t10k-images-idx3-ubyte\.gz is a directory, not a file",
                 id="data-file-is-directory"),
    pytest.param(_broken_link, r"link is a broken symbolic link", id="broken-link"),
    pytest.param(_empty_folder, r"lacks train-images-idx3-ubyte\.gz \(or uncompressed\), "
                 r"train-labels.*t10k-images.*t10k-labels", id="empty-folder-lists-each"),
]


def _complete_elsewhere(isolated: Path) -> None:
    """The dataset is complete in every other place: a fallback would find it."""
    make_mnist(isolated / "no-system" / "mnist", seed=1)
    make_mnist(isolated / "no-cache" / "mnist", seed=2)


@pytest.mark.parametrize("make, expected", BAD_LOCATIONS)
def test_bad_data_dir_fails_and_never_falls_back(tmp_path, monkeypatch, make, expected):
    _complete_elsewhere(tmp_path)
    monkeypatch.setenv(ds.ENV_VAR, str(make_mnist(tmp_path / "env" / "mnist", seed=3)))
    bad = make(tmp_path / "given")
    for call in (lambda: find_dataset_dir("mnist", bad), lambda: load_dataset("mnist", "train", bad),
                 lambda: split_file_records("mnist", "test", bad)):
        with pytest.raises(DataError, match=expected) as err:
            call()
        msg = one_line(err)
        assert "data_dir" in msg and str(tmp_path / "given") in msg
        assert "env" + os.sep not in msg and "no-system" not in msg  # nothing else looked at
        assert "--data-dir" in msg  # how to fix


@pytest.mark.parametrize("make, expected", BAD_LOCATIONS)
def test_bad_env_dir_fails_and_never_falls_back(tmp_path, monkeypatch, make, expected):
    _complete_elsewhere(tmp_path)
    monkeypatch.setenv(ds.ENV_VAR, str(make(tmp_path / "env")))
    with pytest.raises(DataError, match=expected) as err:
        load_dataset("mnist", "train")
    msg = one_line(err)
    assert "$SIGPROP_DATA" in msg and "no-system" not in msg and "unset" in msg


def test_subfolder_is_reported_when_it_is_the_incomplete_one(tmp_path):
    folder = make_mnist(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        find_dataset_dir("mnist", tmp_path)
    msg = one_line(err)
    assert f"data_dir folder {folder} lacks t10k-labels-idx1-ubyte.gz" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_explicit_folder_itself_or_parent(tmp_path, gz):
    folder = make_mnist(tmp_path / "mnist", gz=gz)
    assert find_dataset_dir("mnist", tmp_path) == folder
    assert find_dataset_dir("mnist", folder) == folder
    assert find_dataset_dir("mnist", str(folder)) == folder
    assert len(load_dataset("mnist", "test", folder)[0]) == 3


def test_env_is_the_only_place_when_set(tmp_path, monkeypatch):
    _complete_elsewhere(tmp_path)
    env = make_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    assert find_dataset_dir("mnist") == env
    monkeypatch.setenv(ds.ENV_VAR, "")  # set but empty: the default places
    assert find_dataset_dir("mnist") == tmp_path / "no-system" / "mnist"


@pytest.mark.parametrize("origin", ["data_dir", "env"])
def test_explicit_location_never_falls_back(roots, tmp_path, monkeypatch, origin):
    given = tmp_path / "given"
    given.mkdir()
    (given / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    if origin == "env":
        monkeypatch.setenv(ds.ENV_VAR, str(given))
    with pytest.raises(DataError) as err:
        find_dataset_dir("fashion-mnist", given if origin == "data_dir" else None)
    msg = str(err.value)
    assert str(given) in msg and "train-labels-idx1-ubyte" in msg
    assert ("SIGPROP_DATA" in msg) == (origin == "env")
    assert str(roots) not in msg  # the complete system copy was not used
    assert find_dataset_dir("fashion-mnist", roots) == roots  # an explicit good one is


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_data_dir_is_a_config_error(value):
    for call in (find_dataset_dir, lambda n, d: load_dataset(n, "train", d),
                 lambda n, d: split_file_records(n, "train", d)):
        with pytest.raises(ConfigError, match="data_dir is empty") as err:
            call("mnist", value)
        one_line(err)


@pytest.mark.parametrize("value", ["a" * 5000, "/tmp/" + "/".join(["abcdefgh"] * 600),
                                   "/tmp/nul\0byte", "/tmp/new\nline"])
@pytest.mark.parametrize("origin", ["data_dir", "env"])
def test_unusable_paths_are_one_line(monkeypatch, value, origin):
    if origin == "env":
        if "\0" in value:
            pytest.skip("an environment variable cannot hold a NUL byte")
        monkeypatch.setenv(ds.ENV_VAR, value)
        args: tuple = ()
    else:
        args = (value,)
    for name in ("mnist", "cifar10", "svhn"):
        with pytest.raises(DataError) as err:
            load_dataset(name, "train", *args)
        msg = one_line(err)
        assert ("data_dir" if origin == "data_dir" else "$SIGPROP_DATA") in msg
        assert len(msg) < 1000  # a 5,000-character path is shortened


def test_unprobeable_paths_are_one_line(roots, monkeypatch):
    monkeypatch.setenv(ds.ENV_VAR, "d" * 5000)
    with pytest.raises(DataError, match="SIGPROP_DATA"):
        find_dataset_dir("fashion-mnist")
    monkeypatch.delenv(ds.ENV_VAR)
    with pytest.raises(SigpropErrors):
        find_dataset_dir("fashion-mnist", "bad\0path")
    with pytest.raises(ConfigError, match="empty"):
        find_dataset_dir("fashion-mnist", "")


SigpropErrors = (DataError, ConfigError)


def test_data_list_survives_unusable_env(monkeypatch, capsys, tmp_path):
    from sigprop.cli import main

    make_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "env" / "mnist") in out and "cifar10" in out and "not found" in out
    monkeypatch.setenv(ds.ENV_VAR, "a" * 5000)
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(DATASETS.names()) and all("not found" in line for line in out)


def test_cifar_partly_extracted_and_archive_directory(tmp_path):
    make_cifar10(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks cifar-10-python\.tar\.gz.*"
                       r"cifar-10-batches-py/ holds some batches but lacks data_batch_3") as err:
        load_dataset("cifar10", "test", tmp_path)
    one_line(err)
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").mkdir()
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz is a directory, not a file"):
        find_dataset_dir("cifar10", tmp_path)


def test_svhn_required_file_is_directory(tmp_path):
    make_svhn(tmp_path / "svhn" / "train_32x32.mat", 2)
    (tmp_path / "svhn" / "test_32x32.mat").mkdir()
    with pytest.raises(DataError, match=r"test_32x32\.mat is a directory, not a file") as err:
        load_dataset("svhn", "train", tmp_path)
    one_line(err)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("case", ["nonexistent", "empty folder", "a file", "missing one file",
                                  "data file is a folder"])
def test_explicit_data_dir_is_used_or_fails(in_tmp, capsys, fake_fashion, case):
    import shutil

    where = in_tmp / "data"
    if case == "empty folder":
        where.mkdir()
    elif case == "a file":
        where.write_text("x")
    elif case in ("missing one file", "data file is a folder"):
        shutil.copytree(fake_fashion, where)
        (where / "train-labels-idx1-ubyte.gz").unlink()
        if case == "data file is a folder":
            (where / "train-labels-idx1-ubyte.gz").mkdir()
    line = one_error_line(capsys, main(["train", "--data-dir", str(where), "--run-dir", "r",
                                        *FAST]))
    assert str(where) in line
    if case.startswith(("missing", "data file")):
        assert "train-labels-idx1-ubyte" in line
    assert not (in_tmp / "r").exists()  # nothing left behind


def test_eval_with_explicit_missing_data_dir_fails(finished, capsys):
    line = one_error_line(capsys, main(["eval", str(finished), "--data-dir", "/nonexistent"]))
    assert "/nonexistent" in line


def test_sigprop_data_env_is_used_or_fails(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("SIGPROP_DATA", str(in_tmp / "nowhere"))
    line = one_error_line(capsys, main(["train", "--run-dir", "r", *FAST]))
    assert "SIGPROP_DATA" in line and "nowhere" in line
    monkeypatch.setenv("SIGPROP_DATA", "d" * 5000)
    one_error_line(capsys, main(["train", "--run-dir", "r", *FAST]))
    assert not (in_tmp / "r").exists()
