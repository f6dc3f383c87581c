"""Tests of sigprop.data: readers on tiny files in the true formats, lookup, download, loader."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import make_cifar, make_svhn_mat, write_cifar_members  # noqa: F401

import sigprop.data.datasets as ds
from sigprop.data import (
    Augment,
    DeviceLoader,
    check_dataset,
    dataset_spec,
    download_dataset,
    download_file,
    find_dataset_dir,
    load_cifar,
    load_dataset,
    load_idx,
    load_svhn_mat,
    parse_augment,
    read_idx,
)
from sigprop.data.augment import crop_with_offsets, flip_with_mask
from sigprop.errors import ConfigError, DataError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@pytest.fixture(autouse=True)
def isolated_roots(tmp_path, monkeypatch):
    """Point the system and cache roots at empty temp folders and clear $SIGPROP_DATA."""
    system, cache = tmp_path / "system", tmp_path / "cache"
    monkeypatch.setattr(ds, "SYSTEM_ROOT", system)
    monkeypatch.setattr(ds, "CACHE_ROOT", cache)
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    return system, cache


# --------------------------------------------------------------------------- file writers


def idx_bytes(arr: np.ndarray, magic: bytes = b"\x00\x00\x08") -> bytes:
    return magic + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dataset(folder: Path, n: int = 6, gz: bool = True, seed: int = 0) -> dict:
    """Both splits of an MNIST-style dataset; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, (img_name, lbl_name) in IDX_NAMES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = "" if gz else ".gz"
        write(folder / img_name.removesuffix(suffix), idx_bytes(images), gz)
        write(folder / lbl_name.removesuffix(suffix), idx_bytes(labels), gz)
        out[split] = (images, labels)
    return out


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    data = make_idx_dataset(tmp_path, gz=gz)
    img_name, lbl_name = IDX_NAMES["train"]
    suffix = "" if gz else ".gz"
    images, labels = load_idx(
        tmp_path / img_name.removesuffix(suffix), tmp_path / lbl_name.removesuffix(suffix)
    )
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (6,)
    assert np.array_equal(images[:, 0].numpy(), data["train"][0])
    assert np.array_equal(labels.numpy(), data["train"][1])


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    full = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path = write(tmp_path / "imgs.idx", full[:-5], gz)
    with pytest.raises(DataError, match=r"imgs\.idx.*truncated or corrupt.*download it again"):
        read_idx(path, 3)


def test_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "x", idx_bytes(np.zeros((3, 4, 4), np.uint8)) + b"\0", gz=False)
    with pytest.raises(DataError, match="needs 64 bytes but the file has 65"):
        read_idx(path, 3)


def test_gzip_cut_short(tmp_path):
    gz = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "labels.gz"
    path.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match=r"labels\.gz.*decompress"):
        read_idx(path, 1)


def test_gzip_garbage(tmp_path):
    path = tmp_path / "junk.gz"
    path.write_bytes(b"\x1f\x8b" + b"this is not deflate data" * 4)
    with pytest.raises(DataError, match=r"junk\.gz"):
        read_idx(path, 1)


@pytest.mark.parametrize(
    "magic, ndim, match",
    [
        (b"\x01\x02\x08", 1, "bad magic"),
        (b"\x00\x00\x0d", 1, "element type 0x0d"),  # float32 IDX
        (b"\x00\x00\x08", 3, "1 dimensions, expected 3"),
    ],
)
def test_idx_bad_header(tmp_path, magic, ndim, match):
    path = write(tmp_path / "bad.idx", idx_bytes(np.zeros(5, np.uint8), magic=magic), gz=True)
    with pytest.raises(DataError, match=match):
        read_idx(path, ndim)


def test_idx_count_mismatch(tmp_path):
    imgs = write(tmp_path / "i", idx_bytes(np.zeros((3, 2, 2), np.uint8)), gz=False)
    lbls = write(tmp_path / "l", idx_bytes(np.zeros(4, np.uint8)), gz=False)
    with pytest.raises(DataError, match="4 labels for 3 images"):
        load_idx(imgs, lbls)


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz", 1)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("as_tar", [False, True])
@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_formats(tmp_path, cifar100, as_tar):
    name = "cifar100" if cifar100 else "cifar10"
    truth = make_cifar(tmp_path / name, cifar100=cifar100, as_tar=as_tar)
    for split in ("train", "test"):
        images, labels = load_dataset(name, split, tmp_path)
        data, lab = truth[split]
        assert images.dtype == torch.uint8 and images.shape == (len(data), 3, 32, 32)
        assert labels.dtype == torch.int64
        assert np.array_equal(images.reshape(len(data), -1).numpy(), data)
        # Row layout is 1024 R, then G, then B: pixel (c, h, w) is at c*1024 + h*32 + w.
        assert images[0, 2, 5, 7] == data[0, 2 * 1024 + 5 * 32 + 7]
        assert np.array_equal(labels.numpy(), lab)  # fine labels for CIFAR-100
    assert len(load_dataset(name, "train", tmp_path)[0]) == (4 if cifar100 else 20)


def test_cifar_folder_itself(tmp_path):
    make_cifar(tmp_path)
    images, _ = load_dataset("cifar10", "test", tmp_path / "cifar-10-batches-py")
    assert images.shape == (4, 3, 32, 32)


def test_cifar_bad_pickle(tmp_path):
    write(tmp_path / "test_batch", b"\x80\x02garbage", gz=False)
    with pytest.raises(DataError, match=r"test_batch.*unpickle"):
        load_cifar(tmp_path, ["test_batch"])


def test_cifar_bad_shape(tmp_path):
    batch = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    write(tmp_path / "test_batch", pickle.dumps(batch, protocol=2), gz=False)
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar(tmp_path, ["test_batch"])


def test_cifar_corrupt_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*sigprop data download cifar10"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_archive_missing_member(tmp_path):
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz"):
        pass
    with pytest.raises(DataError, match="archive lacks f/test_batch"):
        load_cifar(tmp_path / "a.tar.gz", ["test_batch"], "f")


# --------------------------------------------------------------------------- SVHN


def test_svhn_mat(tmp_path):
    x, y = make_svhn_mat(tmp_path / "test_32x32.mat", 5)
    images, labels = load_svhn_mat(tmp_path / "test_32x32.mat")
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels[0] == 0  # 10 -> 0
    assert np.array_equal(labels.numpy(), y[:, 0] % 10)
    assert images[3, 1, 4, 9] == x[4, 9, 1, 3]  # X is (H, W, C, N)
    assert int(labels.max()) <= 9


def test_svhn_splits(tmp_path):
    folder = tmp_path / "svhn"
    make_svhn_mat(folder / "train_32x32.mat", 3, seed=1)
    make_svhn_mat(folder / "test_32x32.mat", 2, seed=2)
    assert len(load_dataset("svhn", "train", tmp_path)[0]) == 3
    with pytest.raises(DataError, match=r"extra_32x32\.mat: not found.*ufldl"):
        load_dataset("svhn", "extra", tmp_path)
    make_svhn_mat(folder / "extra_32x32.mat", 4, seed=3)
    images, labels = load_dataset("svhn", "train+extra", tmp_path)
    assert images.shape == (7, 3, 32, 32) and labels.shape == (7,)
    assert torch.equal(images[3:], load_dataset("svhn", "extra", tmp_path)[0])


def test_svhn_corrupt(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 10)
    with pytest.raises(DataError, match=r"train_32x32\.mat"):
        load_svhn_mat(tmp_path / "train_32x32.mat")


def test_svhn_wrong_shape(tmp_path):
    scipy.io.savemat(tmp_path / "t.mat", {"X": np.zeros((28, 28, 1, 2), np.uint8), "y": [[1], [2]]})
    with pytest.raises(DataError, match=r"expected uint8 \(32, 32, 3, N\)"):
        load_svhn_mat(tmp_path / "t.mat")


# --------------------------------------------------------------------------- specs, lookup


def test_specs():
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"):
        spec = dataset_spec(name)
        assert len(spec.mean) == len(spec.std) == spec.shape[0]
    assert dataset_spec("fashion-mnist").mean == (0.2860,)
    assert dataset_spec("cifar100").num_classes == 100
    assert dataset_spec("mnist").default_augment == Augment()
    assert dataset_spec("cifar10").default_augment == Augment(4, True)
    assert dataset_spec("svhn").default_augment == Augment(4, False)  # no flip for digits
    with pytest.raises(ConfigError, match="choose one of"):
        dataset_spec("imagenet")


def test_parse_augment():
    svhn = dataset_spec("svhn")
    assert parse_augment("none") == Augment()
    assert parse_augment("crop") == Augment(4)
    assert parse_augment("crop8") == Augment(8)
    assert parse_augment("flip") == Augment(0, True)
    assert parse_augment("crop+flip") == parse_augment("flip+crop") == Augment(4, True)
    assert parse_augment("auto", svhn) == svhn.default_augment
    assert str(Augment(4, True)) == "crop4+flip" and str(Augment()) == "none"
    for bad in ("rotate", "crop+crop", "", "auto", "crop-4"):
        with pytest.raises(ConfigError):
            parse_augment(bad)


def test_idx_dataset_and_bad_split(tmp_path):
    truth = make_idx_dataset(tmp_path / "mnist", gz=False)
    images, _ = load_dataset("mnist", "test", tmp_path)
    assert np.array_equal(images[:, 0].numpy(), truth["test"][0])
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        load_dataset("mnist", "valid", tmp_path)


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


# --------------------------------------------------------------------------- download


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


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
    assert list(dest.parent.iterdir()) == []


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
    monkeypatch.setattr(ds, "dataset_spec", lambda name: dataclasses.replace(spec, files=files))
    calls: list[str] = []

    def opener(url: str, timeout: float):
        assert timeout == ds.DEFAULT_STALL_TIMEOUT  # the stall timeout is the socket timeout
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


def test_spec_checksums():
    # The official md5s (as torchvision uses them); a typo would make every download fail.
    got = {f.name: f.md5 for n in ds.DATASETS.names() for f in dataset_spec(n).files}
    assert got["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert got["extra_32x32.mat"] == "a93ce644f1a588dc4d68dda5feec44a7"
    assert {f.md5 for f in dataset_spec("mnist").files} == {
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c",
    }


# --------------------------------------------------------------------------- check


def test_check_dataset(tmp_path):
    make_idx_dataset(tmp_path / "mnist")
    report = check_dataset("mnist", tmp_path)
    assert report.directory == tmp_path / "mnist"
    assert {f.status for f in report.files} == {"md5 mismatch"}  # synthetic files
    assert report.ok and [s.split for s in report.splits] == ["train", "test"]
    assert "split train: ok - 6 images" in report.summary()
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bxx")
    report = check_dataset("mnist", tmp_path)
    assert not report.ok and "t10k-images" in report.splits[1].detail


def test_check_dataset_decompressed_and_extracted(tmp_path):
    make_idx_dataset(tmp_path / "mnist", gz=False)
    assert {f.status for f in check_dataset("mnist", tmp_path).files} == {"decompressed"}
    make_cifar(tmp_path / "cifar10")
    report = check_dataset("cifar10", tmp_path)
    assert report.ok and report.files[0].status == "extracted"


# --------------------------------------------------------------------------- DeviceLoader


def tiny(n: int = 10, c: int = 3, h: int = 5, w: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return images, torch.arange(n)


def loader(images, labels, **kw) -> DeviceLoader:
    c = images.shape[1]
    kw = {"batch_size": 4, "mean": (0.5,) * c, "std": (0.25,) * c, **kw}
    return DeviceLoader(images, labels, **kw)


def to_pixels(x: torch.Tensor, mean=0.5, std=0.25) -> torch.Tensor:
    return ((x * std + mean) * 255).round().to(torch.uint8)


def test_loader_covers_each_sample_once():
    images, labels = tiny(10)
    dl = loader(images, labels)
    assert len(dl) == 3 and dl.num_samples == 10
    batches = list(dl.epoch(0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(10)) and ys.tolist() != list(range(10))
    for x, y in batches:  # images travel with their labels
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(to_pixels(x), images[y])


def test_loader_deterministic_and_resumable():
    images, labels = tiny(10)
    a, b = loader(images, labels, augment=Augment(2, True), seed=3), loader(
        images, labels, augment=Augment(2, True), seed=3
    )
    list(a.epoch(0))  # a fresh loader (b) must give epoch 1 exactly as a continuing one
    e1a, e1b = list(a.epoch(1)), list(b.epoch(1))
    for (xa, ya), (xb, yb) in zip(e1a, e1b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    tail = list(b.epoch(1, start_batch=1))  # mid-epoch resume
    assert all(torch.equal(x, xa) for (x, _), (xa, _) in zip(tail, e1a[1:]))
    e2 = torch.cat([y for _, y in a.epoch(2)])
    assert not torch.equal(e2, torch.cat([y for _, y in e1a]))
    other_seed = torch.cat([y for _, y in loader(images, labels, seed=4).epoch(1)])
    assert not torch.equal(other_seed, torch.cat([y for _, y in e1a]))


def test_loader_eval_order_and_drop_last():
    images, labels = tiny(10)
    dl = loader(images, labels, shuffle=False, drop_last=True)
    assert len(dl) == 2
    ys = torch.cat([y for _, y in dl.epoch(5)])
    assert ys.tolist() == list(range(8))


def test_loader_normalisation():
    images, labels = tiny(6, c=3)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    dl = DeviceLoader(images, labels, batch_size=6, mean=mean, std=std, shuffle=False)
    (x, _), = dl.epoch(0)
    ref = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()) / torch.tensor(
        std
    ).view(1, 3, 1, 1).double()
    torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-5)
    (x16, _), = DeviceLoader(images, labels, batch_size=6, mean=mean, std=std, shuffle=False,
                             dtype=torch.bfloat16).epoch(0)
    assert x16.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"mean": (0.5,)}, "one per channel"),
        ({"std": (0.0, 1.0, 1.0)}, "positive"),
        ({"dtype": torch.int32}, "floating"),
    ],
)
def test_loader_bad_args(kw, match):
    images, labels = tiny(4)
    with pytest.raises(ConfigError, match=match):
        loader(images, labels, **kw)
    with pytest.raises(ConfigError, match="uint8"):
        loader(images.float(), labels)


def slow_crop(x, padding, oy, ox):
    """Per-sample reference for crop_with_offsets."""
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    for b in range(x.shape[0]):
        canvas = torch.zeros(x.shape[1], h + 2 * padding, w + 2 * padding, dtype=x.dtype)
        canvas[:, padding : padding + h, padding : padding + w] = x[b]
        out[b] = canvas[:, int(oy[b]) : int(oy[b]) + h, int(ox[b]) : int(ox[b]) + w]
    return out


def test_crop_matches_reference():
    x, _ = tiny(7, c=2, h=5, w=6)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 7, (2, 7), generator=g)
    got = crop_with_offsets(x, 3, oy, ox)
    assert got.shape == x.shape and got.dtype == torch.uint8
    assert torch.equal(got, slow_crop(x, 3, oy, ox))
    centre = torch.full((7,), 3)
    assert torch.equal(crop_with_offsets(x, 3, centre, centre), x)
    zero = torch.zeros(7, dtype=torch.long)
    assert torch.equal(crop_with_offsets(x, 0, zero, zero), x)


def test_flip_matches_reference():
    x, _ = tiny(6)
    mask = torch.tensor([True, False, True, True, False, False])
    got = flip_with_mask(x, mask)
    for b in range(6):
        assert torch.equal(got[b], x[b].flip(-1) if mask[b] else x[b])


def test_loader_no_padding_is_identity():
    images, labels = tiny(8)
    plain = list(loader(images, labels, seed=1).epoch(0))
    crop0 = list(loader(images, labels, seed=1, augment=Augment(crop_padding=0)).epoch(0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, crop0))


def test_loader_augment_outputs_are_crops_or_flips():
    images, labels = tiny(16, c=1, h=4, w=4)
    p = 2
    dl = loader(images, labels, batch_size=16, augment=Augment(p, True))
    (x, y), = dl.epoch(0)
    pixels = to_pixels(x)
    offsets = [(i, j) for i in range(2 * p + 1) for j in range(2 * p + 1)]
    flips_seen, crops_seen = set(), set()
    for b in range(16):
        src = images[y[b]][None]
        matches = [
            (oy, ox, f)
            for oy, ox in offsets
            for f in (False, True)
            if torch.equal(pixels[b], flip_with_mask(
                slow_crop(src, p, [oy], [ox]), torch.tensor([f]))[0])
        ]
        assert matches, f"sample {b} is no crop/flip of its source"
        flips_seen |= {m[2] for m in matches}
        crops_seen |= {m[:2] for m in matches}
    assert flips_seen == {False, True} and len(crops_seen) > 3  # really random


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    images, labels = load_dataset("fashion-mnist", "test", REAL_FASHION)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert torch.bincount(labels).tolist() == [1000] * 10
