"""Datasets: one interface (`ImageDataset`), a registry, and train/val/test splits.

`data.dataset: auto` (the default) resolves to a registry name first (`protoquant.data.detect`);
every loader here accepts it, and the pipeline records the resolved name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protoquant.config import DataConfig
from protoquant.data.base import ImageDataset, PartAnnotations, SubsetDataset, stable_hash
from protoquant.data.cars import StanfordCars
from protoquant.data.cub import CUB200
from protoquant.data.detect import detect_dataset, resolve_dataset
from protoquant.data.fashion_mnist import FashionMNIST
from protoquant.data.funnybirds import FunnyBirds
from protoquant.data.image_folder import ImageFolder, folder_layout
from protoquant.data.imagenet import ImageNet
from protoquant.data.splits import stratified_split, stratified_subset
from protoquant.data.synthetic import SyntheticParts

__all__ = [
    "CUB200",
    "DATASETS",
    "FashionMNIST",
    "FunnyBirds",
    "ImageDataset",
    "ImageFolder",
    "ImageNet",
    "PartAnnotations",
    "Splits",
    "StanfordCars",
    "SubsetDataset",
    "SyntheticParts",
    "detect_dataset",
    "given_splits",
    "load_dataset",
    "load_splits",
    "resolve_dataset",
    "stable_hash",
]


def _synthetic(config: DataConfig, split: str) -> ImageDataset:
    per_class = config.synthetic_train_per_class if split == "train" else config.synthetic_test_per_class
    return SyntheticParts(
        split, num_classes=config.synthetic_classes, images_per_class=per_class, seed=config.synthetic_seed
    )


def _fashion_mnist(config: DataConfig, split: str) -> ImageDataset:
    return FashionMNIST(config.root, split) if config.root else FashionMNIST(split=split)


def _cub(config: DataConfig, split: str) -> ImageDataset:
    return CUB200(config.root, split, crop_to_box=config.crop_to_box)


def _cars(config: DataConfig, split: str) -> ImageDataset:
    return StanfordCars(config.root, split, crop_to_box=config.crop_to_box)


def _imagenet(config: DataConfig, split: str) -> ImageDataset:
    return ImageNet(config.root, split)


def _funnybirds(config: DataConfig, split: str) -> ImageDataset:
    return FunnyBirds(config.root, split)


def _image_folder(config: DataConfig, split: str) -> ImageDataset:
    return ImageFolder(
        config.root,
        split,
        split_file=config.split_file,
        test_fraction=config.test_fraction,
        split_seed=config.split_seed,
    )


# name -> factory(config, "train" | "test", or "val" where `given_splits` lists it)
DATASETS: dict[str, Callable[[DataConfig, str], ImageDataset]] = {
    "synthetic": _synthetic,
    "fashion-mnist": _fashion_mnist,
    "cub": _cub,
    "cars": _cars,
    "imagenet": _imagenet,
    "funnybirds": _funnybirds,
    "image-folder": _image_folder,
}
CROP_DATASETS = ("cub", "cars")  # the datasets that honour data.crop_to_box
SPLIT_FILE_DATASETS = ("image-folder",)  # the datasets that honour data.split_file


def given_splits(config: DataConfig) -> tuple[str, ...]:
    """The splits the dataset itself defines: train, test, and val where its layout has one."""
    config = resolve_dataset(config)
    if config.dataset == "image-folder":
        return tuple(
            s for s in ("train", "val", "test") if s in folder_layout(Path(config.root), config.split_file)
        )
    return ("train", "test")


def load_dataset(config: DataConfig, split: str) -> ImageDataset:
    """The official `split` ("train", "test", or a given "val") of the dataset named in `config`."""
    config = resolve_dataset(config)
    if config.dataset not in DATASETS:
        valid = ", ".join(["auto", *sorted(DATASETS)])
        raise ValueError(f"unknown dataset '{config.dataset}'; valid: {valid}")
    if config.crop_to_box and config.dataset not in CROP_DATASETS:
        raise ValueError(
            f"data.crop_to_box is supported by {' and '.join(CROP_DATASETS)} only, not {config.dataset}"
        )
    if config.split_file and config.dataset not in SPLIT_FILE_DATASETS:
        raise ValueError(f"data.split_file is read by {SPLIT_FILE_DATASETS[0]} only, not {config.dataset}")
    return DATASETS[config.dataset](config, split)


@dataclass(frozen=True)
class Splits:
    """train and val: the official val split where the data has one, else disjoint parts of train.

    test is the official test split (for a folder of images without one, the carved test split).
    """

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    val_source: str = "carved"  # "carved" from train, or "given" by the data (its own val split)


def load_splits(config: DataConfig, seed: int) -> Splits:
    """Train/val/test: the given val split, else val carved from train (seeded, stratified); optional caps."""
    config = resolve_dataset(config)
    full_train = load_dataset(config, "train")
    test = load_dataset(config, "test")
    if config.max_train_per_class:
        full_train = full_train.subset(stratified_subset(full_train.labels, config.max_train_per_class, seed))
    if config.max_test_per_class:
        test = test.subset(stratified_subset(test.labels, config.max_test_per_class, seed))
    if "val" in given_splits(config):
        return Splits(train=full_train, val=load_dataset(config, "val"), test=test, val_source="given")
    train_idx, val_idx = stratified_split(full_train.labels, config.val_fraction, seed)
    train, val = full_train.subset(train_idx), full_train.subset(val_idx)
    train.split, val.split = "train", "val"
    return Splits(train=train, val=val, test=test)
