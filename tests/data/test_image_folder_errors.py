"""An image folder without a single training image is refused, naming the folder."""

from __future__ import annotations

import pytest

from protoquant.data.image_folder import ImageFolder
from protoquant.errors import DataError


def test_class_folders_without_images_are_named(tmp_path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"image-folder {tmp_path}: no training images.*\.jpg"):
        ImageFolder(tmp_path, "train")
