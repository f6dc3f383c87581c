"""What each dataset is: shape, classes, normalisation, default augmentation, and the
official files (URL, md5) each split is read from. A new dataset is one function with
``@register_dataset``; :func:`dataset_spec` looks it up by name."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import DATASETS, register_dataset
from .augment import DEFAULT_CROP_PADDING, Augment


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name inside the dataset folder
    url: str
    md5: str
    optional: bool = False  # not needed for train/test (SVHN extra: 1.3 GB)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of pixel / 255
    std: tuple[float, ...]
    default_augment: Augment
    files: tuple[RemoteFile, ...]
    # split -> files (IDX, SVHN) or archive members (CIFAR) it is read from
    split_files: tuple[tuple[str, tuple[str, ...]], ...]
    format: str  # "idx" | "cifar" | "svhn"
    archive_folder: str = ""  # CIFAR: folder inside the .tar.gz / extracted folder name
    install_hint: str = ""  # extra way to get the files, for the not-found message

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s, _ in self.split_files)

    def files_for(self, split: str) -> tuple[str, ...]:
        for s, names in self.split_files:
            if s == split:
                return names
        raise ConfigError(
            f"unknown split {split!r} for dataset {self.name!r}; choose one of: "
            + ", ".join(self.splits)
        )

    @property
    def required_files(self) -> tuple[RemoteFile, ...]:
        return tuple(f for f in self.files if not f.optional)


def _idx_spec(name: str, base_url: str, md5s: tuple[str, str, str, str], **kw) -> DatasetSpec:
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    return DatasetSpec(
        name=name,
        shape=(1, 28, 28),
        num_classes=10,
        default_augment=Augment(),
        files=tuple(RemoteFile(n, base_url + n, m) for n, m in zip(names, md5s)),
        split_files=(("train", names[:2]), ("test", names[2:])),
        format="idx",
        **kw,
    )


@register_dataset("mnist")
def _mnist() -> DatasetSpec:
    return _idx_spec(
        "mnist",
        # yann.lecun.com now often refuses downloads; this is torchvision's mirror.
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
        mean=(0.1307,),
        std=(0.3081,),
    )


@register_dataset("fashion-mnist")
def _fashion_mnist() -> DatasetSpec:
    return _idx_spec(
        "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
        mean=(0.2860,),
        std=(0.3530,),
        install_hint="apt-get install -y dataset-fashion-mnist",
    )


def _cifar_spec(name: str, archive: str, md5: str, folder: str, classes: int,
                split_files: tuple[tuple[str, tuple[str, ...]], ...], **kw) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        shape=(3, 32, 32),
        num_classes=classes,
        # Sec. IV: random cropping for all datasets, horizontal flips for CIFAR.
        default_augment=Augment(crop_padding=DEFAULT_CROP_PADDING, flip=True),
        files=(RemoteFile(archive, "https://www.cs.toronto.edu/~kriz/" + archive, md5),),
        split_files=split_files,
        format="cifar",
        archive_folder=folder,
        **kw,
    )


@register_dataset("cifar10")
def _cifar10() -> DatasetSpec:
    return _cifar_spec(
        "cifar10",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        10,
        (("train", tuple(f"data_batch_{i}" for i in range(1, 6))), ("test", ("test_batch",))),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )


@register_dataset("cifar100")
def _cifar100() -> DatasetSpec:
    return _cifar_spec(
        "cifar100",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        100,
        (("train", ("train",)), ("test", ("test",))),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    )


@register_dataset("svhn")
def _svhn() -> DatasetSpec:
    url = "http://ufldl.stanford.edu/housenumbers/"
    train, test, extra = "train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"
    return DatasetSpec(
        name="svhn",
        shape=(3, 32, 32),
        num_classes=10,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        # Digits: a mirrored 2 or 5 is not a digit, so crop only.
        default_augment=Augment(crop_padding=DEFAULT_CROP_PADDING),
        files=(
            RemoteFile(train, url + train, "e26dedcc434d2e4c54c9b2d4a06d8373"),
            RemoteFile(test, url + test, "eb5a983be6a315427106f1b164d9cef3"),
            RemoteFile(extra, url + extra, "a93ce644f1a588dc4d68dda5feec44a7", optional=True),
        ),
        split_files=(
            ("train", (train,)),
            ("test", (test,)),
            ("extra", (extra,)),
            ("train+extra", (train, extra)),
        ),
        format="svhn",
    )


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset; unknown names raise ConfigError listing the choices."""
    return DATASETS.get(name)()
