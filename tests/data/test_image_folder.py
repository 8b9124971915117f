"""Image folders: split file (format, errors, unlisted files) and train/test folders.

The layouts without a test split or with a val split are in test_image_folder_layouts.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protoquant.config import DataConfig
from protoquant.data import load_dataset
from protoquant.data.image_folder import ImageFolder
from tests.data.layouts import write_image, write_image_folder, write_lines


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path)


def test_split_file_membership_labels_and_order(folder: Path) -> None:
    train = ImageFolder(folder, "train", split_file="split.txt")
    test = ImageFolder(folder, "test", split_file=folder / "split.txt")  # absolute path works too
    assert train.classes == ("cat", "dog")
    assert train.files == ("cat/a.png", "cat/sub/c.png", "dog/d.JPEG") and train.labels.tolist() == [0, 0, 1]
    assert test.files == ("cat/b.jpg", "dog/e f.png") and test.labels.tolist() == [0, 1]
    assert train.load_image(2).size == (10, 8)


def test_unlisted_and_non_image_files_are_reported(folder: Path) -> None:
    train = ImageFolder(folder, "train", split_file="split.txt")
    assert train.skipped == (
        "1 images not listed in split.txt were left out (e.g. dog/g.png)",
        "1 non-image files left out (e.g. dog/notes.txt)",
    )


def test_registry_passes_the_split_file(folder: Path) -> None:
    config = DataConfig(dataset="image-folder", root=str(folder), split_file="split.txt")
    assert load_dataset(config, "test").files == ("cat/b.jpg", "dog/e f.png")
    with pytest.raises(ValueError, match="crop_to_box is supported by cub and cars only"):
        load_dataset(DataConfig(dataset="image-folder", root=str(folder), crop_to_box=True), "train")
    with pytest.raises(ValueError, match="split_file is read by image-folder only, not synthetic"):
        load_dataset(DataConfig(split_file="split.txt"), "train")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cat/missing.png train", r"split\.txt:8: listed image .*cat/missing\.png does not exist"),
        ("cat/a.png dev", r"split\.txt:8: expected '<relative path> <train\|val\|test>'"),
        ("cat/a.png test", r"split\.txt:8: cat/a\.png is already listed on line 3"),
        ("bird/x.png train", r"split\.txt:8: bird/x\.png is not inside a class folder"),
    ],
)
def test_bad_split_file_lines_are_named(folder: Path, line: str, message: str) -> None:
    with (folder / "split.txt").open("a") as handle:
        handle.write(line + "\n")
    with pytest.raises(ValueError, match=message):
        ImageFolder(folder, "train", split_file="split.txt")


def test_train_and_test_folders(tmp_path: Path) -> None:
    for n, rel in enumerate(
        ["train/b/1.png", "train/a/2.png", "train/a/3.png", "test/b/4.png", "test/b/x.txt"]
    ):
        write_image(tmp_path / rel, (6, 6), seed=n) if rel.endswith(".png") else write_lines(
            tmp_path / rel, ["x"]
        )
    train, test = ImageFolder(tmp_path, "train"), ImageFolder(tmp_path, "test")
    assert train.classes == ("a", "b") and train.files == ("a/2.png", "a/3.png", "b/1.png")
    assert train.labels.tolist() == [0, 0, 1] and train.image_path(0) == tmp_path / "train/a/2.png"
    assert test.files == ("b/4.png",) and test.labels.tolist() == [1]
    assert test.skipped == (
        "1 non-image files in test/ left out (e.g. b/x.txt)",
        "1 class(es) without test images: a",
    )
    write_image(tmp_path / "test/c/5.png", (6, 6), seed=9)
    with pytest.raises(ValueError, match=r"class folder .*test/c does not exist in .*train"):
        ImageFolder(tmp_path, "test")


def test_missing_folders_and_files_are_errors_that_explain(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"split file .*nope\.txt not found"):
        ImageFolder(folder, "train", split_file="nope.txt")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolder(tmp_path / "absent", "train")
