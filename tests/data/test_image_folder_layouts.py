"""Your own images: one folder of class folders, or train/ with val/ and/or test/ beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protoquant.config import DataConfig
from protoquant.data import SubsetDataset, given_splits, load_splits
from protoquant.data.image_folder import ImageFolder, split_sources
from tests.data.layouts import POOL_CLASSES as CLASSES
from tests.data.layouts import write_image, write_lines, write_pool


def _paths(dataset) -> set[str]:
    """Absolute image paths of a dataset or of a subset of one."""
    if isinstance(dataset, SubsetDataset):
        return {str(dataset.parent.image_path(int(i))) for i in dataset.indices}
    return {str(dataset.image_path(i)) for i in range(len(dataset))}


def test_one_pool_is_split_seeded_and_stratified(tmp_path: Path) -> None:
    root = write_pool(tmp_path / "mine")
    train, test = ImageFolder(root, "train", test_fraction=0.3), ImageFolder(root, "test", test_fraction=0.3)
    assert train.classes == test.classes == CLASSES
    assert _paths(train).isdisjoint(_paths(test)) and len(_paths(train) | _paths(test)) == 30
    assert np.bincount(test.labels).tolist() == [3, 3, 3]  # 30 % of each class of 10
    again = ImageFolder(root, "test", test_fraction=0.3)
    assert again.files == test.files and again.fingerprint() == test.fingerprint()
    other = ImageFolder(root, "test", test_fraction=0.3, split_seed=1)
    assert other.files != test.files and other.fingerprint() != test.fingerprint()


def test_one_pool_trains_with_val_carved_from_train(tmp_path: Path) -> None:
    root = write_pool(tmp_path / "mine")
    config = DataConfig(root=str(root), test_fraction=0.2, val_fraction=0.25)
    splits = load_splits(config, seed=0)
    assert splits.val_source == "carved" and given_splits(config) == ("train", "test")
    assert [len(splits.train), len(splits.val), len(splits.test)] == [18, 6, 6]
    assert _paths(splits.val) <= _paths(ImageFolder(root, "train", test_fraction=0.2))
    assert _paths(splits.test).isdisjoint(_paths(splits.train) | _paths(splits.val))
    assert splits.train.classes == splits.val.classes == splits.test.classes == CLASSES


def test_given_val_is_the_validation_split(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        write_pool(root, count, prefix=split)
    splits = load_splits(DataConfig(root=str(root), val_fraction=0.5), seed=0)
    assert splits.val_source == "given"
    assert _paths(splits.val) == {str(p) for p in (root / "val").rglob("*.png")}
    assert _paths(splits.train) == {str(p) for p in (root / "train").rglob("*.png")}  # nothing carved
    assert _paths(splits.test) == {str(p) for p in (root / "test").rglob("*.png")}
    assert splits.val.classes == splits.train.classes == CLASSES


def test_train_and_test_folders_carve_val_from_train(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_pool(root, 4, prefix="train")
    write_pool(root, 2, prefix="test")
    splits = load_splits(DataConfig(root=str(root), val_fraction=0.25), seed=0)
    assert splits.val_source == "carved" and [len(splits.train), len(splits.val), len(splits.test)] == [
        9,
        3,
        6,
    ]
    assert _paths(splits.val) | _paths(splits.train) == {str(p) for p in (root / "train").rglob("*.png")}


def test_train_and_val_folders_evaluate_on_val(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_pool(root, 4, prefix="train")
    write_pool(root, 2, prefix="val")
    config = DataConfig(root=str(root), val_fraction=0.25)
    splits = load_splits(config, seed=0)
    assert given_splits(config) == ("train", "test")
    assert _paths(splits.test) == {str(p) for p in (root / "val").rglob("*.png")}  # held out, evaluated
    assert _paths(splits.val) <= {str(p) for p in (root / "train").rglob("*.png")}  # selection: train only


def test_a_class_missing_from_a_split_is_reported_and_an_unknown_one_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    write_pool(root, 2, prefix="train")
    write_image(root / "test" / "cat" / "0.png", (6, 5), seed=1)
    test = ImageFolder(root, "test")
    assert test.classes == CLASSES and test.labels.tolist() == [1]
    assert test.skipped == ("2 class(es) without test images: bee, dog",)
    write_image(root / "test" / "emu" / "0.png", (6, 5), seed=2)
    with pytest.raises(ValueError, match=r"class folder .*test/emu does not exist in .*train"):
        ImageFolder(root, "test")


def test_val_or_test_without_train_is_an_error(tmp_path: Path) -> None:
    write_pool(tmp_path / "mine", 2, prefix="val")
    with pytest.raises(ValueError, match=r"a 'train' split is needed beside val"):
        ImageFolder(tmp_path / "mine", "train")
    assert split_sources({"train"}, "x") == {"train": "train", "test": "carved"}


def test_split_file_with_val_lines(tmp_path: Path) -> None:
    root = write_pool(tmp_path / "mine", 3)
    lines = [f"{c}/{i:02d}.png {('train', 'val', 'test')[i]}" for c in CLASSES for i in range(3)]
    write_lines(root / "split.txt", lines)
    config = DataConfig(root=str(root), split_file="split.txt")
    assert given_splits(config) == ("train", "val", "test")
    splits = load_splits(config, seed=0)
    assert splits.val_source == "given" and splits.val.files == ("bee/01.png", "cat/01.png", "dog/01.png")
    assert splits.test.files == ("bee/02.png", "cat/02.png", "dog/02.png")
    with pytest.raises(ValueError, match=r"image-folder .*pool has no val split \(it has train, test\)"):
        ImageFolder(write_pool(tmp_path / "pool", 2), "val")


def test_a_folder_without_class_folders_says_what_is_expected(tmp_path: Path) -> None:
    write_image(tmp_path / "loose" / "a.png", (6, 5), seed=0)
    with pytest.raises(ValueError, match=r"holds no class folders; expected .*loose/<class>/<image>"):
        ImageFolder(tmp_path / "loose", "train")
