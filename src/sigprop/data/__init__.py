"""Datasets (find, load, download, check, record provenance) and the device-resident loader.

    images, labels = load_dataset("cifar10", "train")
    spec = dataset_spec("cifar10")
    loader = DeviceLoader(images, labels, batch_size=128, mean=spec.mean, std=spec.std,
                          device="cuda", augment=spec.default_augment)
    for x, y in loader.epoch(epoch): ...
"""

from __future__ import annotations

from .augment import Augment, parse_augment
from .check import DatasetCheck, FileCheck, SplitCheck, check_dataset
from .datasets import (
    cache_root,
    check_split_files,
    find_dataset_dir,
    load_dataset,
    split_file_records,
    split_paths,
)
from .download import download_dataset, download_file
from .formats import CorruptFileError, load_cifar, load_idx, load_svhn_mat, read_idx
from .loader import DeviceLoader
from .specs import DatasetSpec, RemoteFile, dataset_spec

__all__ = [
    "Augment",
    "CorruptFileError",
    "DatasetCheck",
    "DatasetSpec",
    "DeviceLoader",
    "FileCheck",
    "RemoteFile",
    "SplitCheck",
    "cache_root",
    "check_dataset",
    "check_split_files",
    "dataset_spec",
    "download_dataset",
    "download_file",
    "find_dataset_dir",
    "load_cifar",
    "load_dataset",
    "load_idx",
    "load_svhn_mat",
    "parse_augment",
    "read_idx",
    "split_file_records",
    "split_paths",
]
