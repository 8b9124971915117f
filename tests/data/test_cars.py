"""Stanford Cars on miniature devkit and torchvision layouts (.mat files written by scipy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from protoquant.config import load_yaml
from protoquant.data.cars import StanfordCars
from tests.data.layouts import CARS_CLASSES, CARS_FIELDS, CARS_TEST, CARS_TRAIN, cars_struct, write_cars


@pytest.fixture
def cars_root(tmp_path: Path) -> Path:
    return write_cars(tmp_path)


@pytest.mark.parametrize("layout", ["devkit", "torchvision"])
def test_both_layouts_give_the_same_dataset(tmp_path: Path, layout: str) -> None:
    root = write_cars(tmp_path, layout=layout)
    train, test = StanfordCars(root, "train"), StanfordCars(root, "test")
    assert train.classes == tuple(CARS_CLASSES)
    assert train.files == ("00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg")
    assert train.labels.tolist() == [2, 0, 1, 0]  # devkit classes 3, 1, 2, 1 -> 0-based
    assert test.labels.tolist() == [1, 2] and test.image_path(0).parent.name == "cars_test"
    assert not train.has_parts and train.has_boxes


def test_box_crop_and_annotations(cars_root: Path) -> None:
    full, crop = StanfordCars(cars_root, "train"), StanfordCars(cars_root, "train", crop_to_box=True)
    image = crop.load_image(0)  # box (5, 6, 40, 30)
    assert image.size == (35, 24)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(full.load_image(0))[6:30, 5:40])
    assert full.annotations(0).box.tolist() == [5, 6, 40, 30]
    parts = crop.annotations(0)
    assert parts.box.tolist() == [0, 0, 35, 24]
    assert parts.keypoints.shape == (0, 2) and parts.visible.shape == (0,) and parts.part_names == ()
    assert crop.fingerprint() != full.fingerprint()


def test_single_annotation_struct_is_read(cars_root: Path) -> None:
    path = cars_root / "cars_test_annos_withlabels.mat"
    scipy.io.savemat(path, {"annotations": cars_struct(CARS_TEST[:1])})
    assert StanfordCars(cars_root, "test").labels.tolist() == [1]


def test_missing_files_are_named(tmp_path: Path, cars_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cars_meta\.mat .*original.*torchvision"):
        StanfordCars(tmp_path / "nowhere", "train")
    (cars_root / "cars_test_annos_withlabels.mat").unlink()
    scipy.io.savemat(cars_root / "devkit" / "cars_test_annos.mat", {"annotations": cars_struct(CARS_TEST)})
    with pytest.raises(FileNotFoundError, match=r"cars_test_annos_withlabels\.mat.*has no labels"):
        StanfordCars(cars_root, "test")
    (cars_root / "devkit" / "cars_train_annos.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"cars_train_annos\.mat"):
        StanfordCars(cars_root, "train")


@pytest.mark.parametrize(
    ("entries", "fields", "message"),
    [
        (
            [("00001.jpg", 4, (5, 6, 40, 30))],
            CARS_FIELDS,
            r"annotation 1 \(00001\.jpg\): class 4 outside 1\.\.3",
        ),
        ([("00001.jpg", 1, (40, 6, 5, 30))], CARS_FIELDS, r"annotation 1 \(00001\.jpg\): box .* empty"),
        (
            CARS_TRAIN[:2] + [("00001.jpg", 1, (1, 1, 9, 9))],
            CARS_FIELDS,
            r"annotation 3 repeats fname 00001\.jpg",
        ),
        (CARS_TRAIN, CARS_FIELDS[:4] + CARS_FIELDS[5:], r"lack field\(s\) \['class'\]"),
    ],
)
def test_bad_annotations_name_file_and_entry(cars_root: Path, entries, fields, message) -> None:
    path = cars_root / "devkit" / "cars_train_annos.mat"
    scipy.io.savemat(path, {"annotations": cars_struct(entries, fields=fields)})
    with pytest.raises(ValueError, match=r"cars_train_annos\.mat: .*" + message.split(": ", 1)[-1]):
        StanfordCars(cars_root, "train")


def test_unreadable_mat_and_wrong_variable(cars_root: Path) -> None:
    (cars_root / "devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match=r"cannot read MATLAB file .*cars_train_annos\.mat"):
        StanfordCars(cars_root, "train")
    scipy.io.savemat(cars_root / "devkit" / "cars_meta.mat", {"names": np.array(["a"])})
    with pytest.raises(ValueError, match=r"cars_meta\.mat: no variable 'class_names'"):
        StanfordCars(cars_root, "test")


def test_box_outside_the_image_is_an_error_in_crop_mode(cars_root: Path) -> None:
    entries = [("00001.jpg", 1, (5, 6, 49, 30))]  # x2 = 49 > width 48
    scipy.io.savemat(cars_root / "devkit" / "cars_train_annos.mat", {"annotations": cars_struct(entries)})
    assert StanfordCars(cars_root, "train").load_image(0).size == (48, 32)
    with pytest.raises(
        ValueError, match=r"cars_train_annos\.mat: annotation 1: box .*\(5, 6, 49, 30\).*48x32"
    ):
        StanfordCars(cars_root, "train", crop_to_box=True).load_image(0)


@pytest.mark.parametrize(
    ("backbone", "name"),
    [("convnext_tiny", "timm/convnext_tiny.fb_in1k"), ("resnet50", "torchvision/resnet50")],
)
def test_ready_made_configs_load(backbone: str, name: str) -> None:
    config = load_yaml(Path(__file__).parents[2] / "configs" / f"cars_{backbone}.yaml")
    assert config.data.dataset == "cars" and config.backbone.name == name
    assert config.codebook.num_prototypes == 4096 and config.head.temperature == 0.1
