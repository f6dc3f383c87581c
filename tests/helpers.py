"""Plain helpers the tests share (the fixtures are in conftest.py): a tiny learnable fake
Fashion-MNIST in IDX .gz format, writers of small files in each dataset format, small
configs, rules and batches, and the checks of the CLI's and the library's one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import sigprop.data.check as data_check
import sigprop.data.datasets as ds
import sigprop.data.download as dl
from sigprop.data import DeviceLoader, dataset_spec
from sigprop.engine.config import Config, apply_overrides
from sigprop.errors import SigpropError
from sigprop.networks import build_network
from sigprop.rules import build_rule

ROOT = Path(__file__).resolve().parents[1]  # the repository
SRC = str(ROOT / "src")  # for a child Python's sys.path
FAKE_TRAIN, FAKE_TEST = 1024, 200
# a fast CLI training: add --data-dir, --run-dir, --epochs
FAST = ["--network", "fc-2x32", "--batch-size", "64", "--no-progress", "--lr", "5e-3"]


# --------------------------------------------------------------------------- fake Fashion-MNIST


def fake_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise plus a bright 7x7 patch whose position (a 4x4 grid of cells) is the class."""
    n = len(labels)
    images = rng.integers(0, 70, (n, 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 4)
        images[i, r * 7 : r * 7 + 7, col * 7 : col * 7 + 7] = rng.integers(180, 256, (7, 7))
    return images


def write_fake_fashion(root: Path, n_train: int = FAKE_TRAIN, n_test: int = FAKE_TEST,
                       seed: int = 0) -> Path:
    """Write ``root/fashion-mnist/*-ubyte.gz`` (learnable) and return that folder."""
    rng = np.random.default_rng(seed)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = fake_images(labels, rng)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return folder


# --------------------------------------------------------------------------- configs, rules, steps


def small_config(data_dir: Path, run_dir: Path | None = None, **sections) -> Config:
    """A fast config on the fake dataset: fc-2x32, batch 64, 2 epochs, no progress bar.

    ``sections`` are ``{section: {key: value}}`` overrides, e.g. ``rule={"name": "backprop"}``.
    """
    base = {
        "data": {"data_dir": str(data_dir), "batch_size": 64, "eval_batch_size": 100},
        "model": {"network": "fc-2x32"},
        "train": {"epochs": 2, "progress": False, "seed": 0,
                  "run_dir": str(run_dir) if run_dir else None},
    }
    cfg = apply_overrides(Config(), base)
    return apply_overrides(cfg, sections)


def blobs(n_per_blob: int = 64, classes: int = 4, blobs_per_class: int = 2, dim: int = 8,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, ``blobs_per_class`` per class, well separated (a learnable toy task)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * blobs_per_class, dim, generator=g) * 3.0
    xs, ys = [], []
    for k in range(classes * blobs_per_class):
        xs.append(centers[k] + 0.5 * torch.randn(n_per_blob, dim, generator=g))
        ys.append(torch.full((n_per_blob,), k % classes))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def sigprop_rule(arch="fc-3x24", input_shape=(1, 6, 6), classes=5, dropout=0.0, seed=0, **kw):
    """A seeded sigprop rule on a small fc net; ``kw`` are rule options."""
    torch.manual_seed(seed)
    net = build_network(arch, input_shape, classes, dropout=dropout)
    return build_rule("sigprop", net, classes, **kw)


def random_batches(k=4, n=30, input_shape=(1, 6, 6), classes=5, seed=3):
    """``k`` seeded (x, y) batches of normal noise and uniform labels."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *input_shape, generator=g), torch.randint(0, classes, (n,), generator=g))
            for _ in range(k)]


def run_steps(rule, batches, seed=7):
    """Training steps over ``batches`` after seeding the dropout stream."""
    rule.set_training(True)
    torch.manual_seed(seed)  # the dropout masks: every path draws the same numbers
    return [rule.train_step(x, y) for x, y in batches]


def lowers_loss(rule, shape, steps: int = 8, n: int = 16, classes: int = 10) -> None:
    """``rule`` on one fixed batch: the sum of its losses falls by over 10% in ``steps``."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, *shape, generator=g), torch.arange(n) % classes
    rule.set_training(True)
    first = rule.train_step(x, y)[0].sum().item()
    for _ in range(steps):
        last = rule.train_step(x, y)[0].sum().item()
    assert math.isfinite(last) and last < first * 0.9, (first, last)


# --------------------------------------------------------------------------- errors and run folders


def one_error_line(capsys, rc) -> str:
    """The CLI's one error line (exit code 2, nothing else on stderr)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sigprop: error: ")
    return lines[0]


def one_line(err: pytest.ExceptionInfo) -> str:
    """The message of a raised SigpropError, checked to be one line without a traceback."""
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert isinstance(err.value, SigpropError)
    return msg


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (the lock file aside)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# --------------------------------------------------------------------------- data files
# Small files in each dataset format and the checks the data tests share.


IDX_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX = IDX_NAMES


def idx_bytes(arr: np.ndarray, magic: bytes = b"\x00\x00\x08") -> bytes:
    """IDX file: the magic (uint8 data), the number of dimensions, one big-endian int32 per
    dimension, the raw bytes."""
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


def make_mnist(folder: Path, n: int = 3, gz: bool = True, seed: int = 0) -> Path:
    """Both splits of an MNIST-style dataset in ``folder`` (gzip or decompressed names)."""
    folder.mkdir(parents=True, exist_ok=True)
    make_idx_dataset(folder, n, gz, seed)
    return folder


def write_cifar_members(folder: Path, spec, members: dict[str, bytes], as_tar: bool) -> None:
    """CIFAR batch files ``members`` (name -> pickled bytes) as shipped: in the extracted
    folder ``folder/<archive_folder>/`` or in ``folder/<archive>.tar.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    if as_tar:
        with tarfile.open(folder / spec.files[0].name, "w:gz") as tar:
            for m, raw in members.items():
                info = tarfile.TarInfo(f"{spec.archive_folder}/{m}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        return
    (folder / spec.archive_folder).mkdir(exist_ok=True)
    for m, raw in members.items():
        (folder / spec.archive_folder / m).write_bytes(raw)


def _cifar_rows(n: int, classes: int, rng, fine: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    key = b"fine_labels" if fine else b"labels"
    batch = {b"batch_label": b"x", b"data": data, key: labels.tolist()}
    if fine:
        batch[b"coarse_labels"] = (labels // 5).tolist()
    return batch, data, labels


def make_cifar(folder: Path, cifar100: bool = False, as_tar: bool = False, n: int = 4) -> dict:
    """CIFAR pickles (bytes keys, as the Python 2 originals) in their folder or tar.gz."""
    rng = np.random.default_rng(1)
    spec = dataset_spec("cifar100" if cifar100 else "cifar10")
    members: dict[str, bytes] = {}
    out = {}
    for split in spec.splits:
        datas, labels = [], []
        for m in spec.files_for(split):
            batch, d, lab = _cifar_rows(n, spec.num_classes, rng, fine=cifar100)
            members[m] = pickle.dumps(batch, protocol=2)
            datas.append(d)
            labels.append(lab)
        out[split] = (np.concatenate(datas), np.concatenate(labels))
    write_cifar_members(folder, spec, members, as_tar)
    return out


def cifar_batch(n: int, classes: int = 10, fine: bool = False, seed: int = 0,
                labels_as_list: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    batch = {b"batch_label": b"training batch 1 of 5",
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    batch[b"fine_labels" if fine else b"labels"] = labels.tolist() if labels_as_list else labels
    return batch


def make_cifar10(folder: Path, as_tar: bool = False, n: int = 2,
                 dump: Callable[[object], bytes] = lambda b: pickle.dumps(b, protocol=2),
                 override: dict[str, bytes] | None = None) -> Path:
    """CIFAR-10 in its extracted folder (``folder/cifar-10-batches-py``) or as the .tar.gz."""
    spec = dataset_spec("cifar10")
    members = {m: dump(cifar_batch(n, seed=i)) for i, m in enumerate(ds.all_members(spec))}
    members.update(override or {})
    write_cifar_members(folder, spec, members, as_tar)
    return folder


def make_svhn_mat(path: Path, n: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10  # the digit 0 is stored as 10
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


def make_svhn(path: Path, n: int) -> Path:
    rng = np.random.default_rng(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                            "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    return path


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def use_spec(monkeypatch, spec) -> None:
    """Every data module that looks a dataset up gets ``spec``, whatever the name."""
    for module in (ds, dl, data_check):
        monkeypatch.setattr(module, "dataset_spec", lambda name: spec)


# --------------------------------------------------------------------------- loader


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


# --------------------------------------------------------------------------- whole runs


def real_fashion_accuracy(run: Path, args: list[str]) -> float:
    """``sigprop train`` with ``args`` on the installed Fashion-MNIST into ``run`` (the
    test is skipped without the data); the last epoch's test accuracy."""
    import json

    from sigprop.cli import main
    from sigprop.data import find_dataset_dir

    try:
        find_dataset_dir("fashion-mnist")
    except SigpropError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    assert main(["train", *args, "--run-dir", str(run), "--no-progress"]) == 0
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]


def smoke_as_mnist(name: str, fake_fashion: Path, root: Path) -> int:
    """Experiment ``name``'s smoke budget on MNIST played by the fake Fashion-MNIST files
    (the same format), into ``root/out``; the exit code."""
    import shutil

    from sigprop.cli import main

    mnist = root / "data" / "mnist"
    shutil.copytree(fake_fashion, mnist)
    return main(["reproduce", name, "--budget", "smoke", "--out", str(root / "out"),
                 "--data-dir", str(mnist), "--no-progress"])


def resume_eval_and_bench(run: Path, rule: str, network: str, shape: str, capsys) -> str:
    """Resume the 1-epoch CLI run ``run`` to 2 epochs, evaluate it, then bench ``rule``
    beside backprop on ``network`` (samples ``shape``, e.g. 1x8x8); the bench's output."""
    import json

    from sigprop.cli import main

    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert main(["eval", str(run)]) == 0
    capsys.readouterr()
    assert main(["bench", "--network", network, "--input", shape, "--rules",
                 f"backprop,{rule}", "--batch-size", "8", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert rule in out and "backprop" in out
    return out
