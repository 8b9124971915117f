"""Datasets: one interface (`ImageDataset`), a registry, and train/val/test splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protoquant.config import DataConfig
from protoquant.data.base import ImageDataset, PartAnnotations, SubsetDataset, stable_hash
from protoquant.data.fashion_mnist import FashionMNIST
from protoquant.data.splits import stratified_split, stratified_subset
from protoquant.data.synthetic import SyntheticParts

__all__ = [
    "DATASETS",
    "FashionMNIST",
    "ImageDataset",
    "PartAnnotations",
    "Splits",
    "SubsetDataset",
    "SyntheticParts",
    "load_dataset",
    "load_splits",
    "stable_hash",
]


def _synthetic(config: DataConfig, split: str) -> ImageDataset:
    per_class = config.synthetic_train_per_class if split == "train" else config.synthetic_test_per_class
    return SyntheticParts(
        split, num_classes=config.synthetic_classes, images_per_class=per_class, seed=config.synthetic_seed
    )


def _fashion_mnist(config: DataConfig, split: str) -> ImageDataset:
    return FashionMNIST(config.root, split) if config.root else FashionMNIST(split=split)


# name -> factory(config, "train" | "test")
DATASETS: dict[str, Callable[[DataConfig, str], ImageDataset]] = {
    "synthetic": _synthetic,
    "fashion-mnist": _fashion_mnist,
}


def load_dataset(config: DataConfig, split: str) -> ImageDataset:
    """The official `split` ("train" or "test") of the dataset named in `config`."""
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{config.dataset}'; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[config.dataset](config, split)


@dataclass(frozen=True)
class Splits:
    """train and val are disjoint parts of the official train split; test is the official test split."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


def load_splits(config: DataConfig, seed: int) -> Splits:
    """Train/val/test, with val carved from train (seeded, stratified) and optional per-class caps."""
    full_train = load_dataset(config, "train")
    test = load_dataset(config, "test")
    if config.max_train_per_class:
        full_train = full_train.subset(stratified_subset(full_train.labels, config.max_train_per_class, seed))
    if config.max_test_per_class:
        test = test.subset(stratified_subset(test.labels, config.max_test_per_class, seed))
    train_idx, val_idx = stratified_split(full_train.labels, config.val_fraction, seed)
    train, val = full_train.subset(train_idx), full_train.subset(val_idx)
    train.split, val.split = "train", "val"
    return Splits(train=train, val=val, test=test)
