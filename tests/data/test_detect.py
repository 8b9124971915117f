"""`data.dataset: auto`: the layout in data.root decides the loader, and the resolved name is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoquant.config import DataConfig
from protoquant.data import detect_dataset, load_dataset, resolve_dataset
from tests.data.layouts import write_cars, write_cub, write_funnybirds, write_image, write_imagenet


def _fashion_mnist(parent: Path) -> Path:
    (parent / "train-images-idx3-ubyte.gz").write_bytes(b"")  # the name is the signature
    return parent


def _image_folder(parent: Path) -> Path:
    write_image(parent / "mine" / "cat" / "a.png", (6, 5), seed=0)
    return parent / "mine"


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (write_cub, "cub"),
        (lambda p: write_cub(p).parent, "cub"),  # the folder above CUB_200_2011/ works too
        (write_funnybirds, "funnybirds"),
        (write_cars, "cars"),
        (lambda p: write_cars(p, layout="torchvision"), "cars"),
        (_fashion_mnist, "fashion-mnist"),
        (write_imagenet, "imagenet"),  # wnid class folders
        (lambda p: write_imagenet(p, val="kaggle"), "imagenet"),
        (lambda p: write_imagenet(p, val="devkit"), "imagenet"),
        (_image_folder, "image-folder"),
    ],
)
def test_each_official_layout_is_recognised(tmp_path: Path, write, name: str) -> None:
    root = write(tmp_path)
    assert detect_dataset(root) == name
    assert resolve_dataset(DataConfig(root=str(root))).dataset == name


def test_auto_without_a_root_is_the_built_in_data_and_names_stay() -> None:
    assert resolve_dataset(DataConfig()).dataset == "synthetic"
    assert resolve_dataset(DataConfig(dataset="image-folder", root="x")).dataset == "image-folder"
    with pytest.raises(FileNotFoundError, match=r"data\.root 'nowhere' is not a folder"):
        resolve_dataset(DataConfig(root="nowhere"))


def test_loaders_accept_auto_and_report_the_resolved_name(tmp_path: Path) -> None:
    cub = load_dataset(DataConfig(root=str(write_cub(tmp_path))), "train")
    assert cub.name == "cub" and len(cub) == 4
    folder = load_dataset(DataConfig(root=str(_image_folder(tmp_path / "f"))), "train")
    assert folder.name == "image-folder" and folder.classes == ("cat",)
