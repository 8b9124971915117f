"""CUB-200-2011 on a miniature official layout: counts, order, crops and part mapping by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoquant.config import DataConfig, load_yaml
from protoquant.data import load_splits
from protoquant.data.cub import CUB200
from tests.data.layouts import CUB_CLASSES, CUB_PARTS, write_cub

BEAK, BACK = CUB_PARTS.index("beak"), CUB_PARTS.index("back")


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    return write_cub(tmp_path)


def set_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_splits_labels_and_class_order(cub_root: Path) -> None:
    train, test = CUB200(cub_root, "train"), CUB200(cub_root, "test")
    assert train.classes == tuple(CUB_CLASSES) and train.part_names == tuple(CUB_PARTS)
    # train_test_split.txt: ids 1, 3, 4, 7 train; 2, 5, 6 test; labels = class id - 1, images.txt order
    assert [f.split("/")[1] for f in train.files] == [
        "Black_Footed_Albatross_0046_18.jpg",
        "Laysan_Albatross_0002_1027.jpg",
        "Sooty_Albatross_0031_1066.jpg",
        "Black_Footed_Albatross_0002_55.jpg",
    ]
    assert train.labels.tolist() == [0, 1, 2, 0] and test.labels.tolist() == [0, 1, 2]
    assert train.has_parts and train.has_boxes and len(test) == 3


def test_root_may_be_the_parent_folder(cub_root: Path) -> None:
    assert CUB200(cub_root.parent, "test").files == CUB200(cub_root, "test").files


def test_full_image_annotations(cub_root: Path) -> None:
    train = CUB200(cub_root, "train")
    assert train.load_image(0).size == (60, 40) and train.load_image(0).mode == "RGB"
    parts = train.annotations(0)
    assert parts.keypoints.shape == (15, 2) and parts.visible.shape == (15,)
    assert parts.visible[BEAK] and parts.keypoints[BEAK].tolist() == [35.5, 12.25]
    assert not parts.visible[BACK] and parts.keypoints[BACK].tolist() == [0.0, 0.0]  # visibility 0
    assert not parts.visible[CUB_PARTS.index("belly")]  # (1 + 3) % 4 == 0 in the fixture
    np.testing.assert_allclose(parts.box, [10.7, 5.2, 10.7 + 30.9, 5.2 + 20.5], rtol=1e-6)


def test_crop_uses_truncated_box_and_maps_parts(cub_root: Path) -> None:
    full, crop = CUB200(cub_root, "train"), CUB200(cub_root, "train", crop_to_box=True)
    # box 10.7 5.2 30.9 20.5 -> (int x, int y, int x + int w, int y + int h) = (10, 5, 40, 25)
    image = crop.load_image(0)
    assert image.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(full.load_image(0))[5:25, 10:40])
    parts = crop.annotations(0)
    assert parts.keypoints[BEAK].tolist() == [35.5 - 10, 12.25 - 5]
    assert parts.box.tolist() == [0, 0, 30, 20]
    assert not parts.visible[BACK] and parts.keypoints[BACK].tolist() == [0.0, 0.0]
    # image 4: box 1.5 2.5 60.9 44.9 -> (1, 2, 61, 46); crown (part 5) at (2.5 + 5 + 4, 1.25 + 10)
    assert crop.load_image(2).size == (60, 44)
    crown = CUB_PARTS.index("crown")
    assert crop.annotations(2).keypoints[crown].tolist() == [11.5 - 1, 11.25 - 2]


def test_fingerprint_tracks_split_crop_and_labels(cub_root: Path) -> None:
    base = CUB200(cub_root, "train").fingerprint()
    assert base == CUB200(cub_root, "train").fingerprint()
    assert base != CUB200(cub_root, "test").fingerprint()
    assert base != CUB200(cub_root, "train", crop_to_box=True).fingerprint()
    set_line(cub_root / "image_class_labels.txt", 1, "1 2")
    assert base != CUB200(cub_root, "train").fingerprint()


def test_validation_split_is_carved_from_train(cub_root: Path) -> None:
    splits = load_splits(DataConfig(dataset="cub", root=str(cub_root), val_fraction=0.25), seed=0)
    train_files = {splits.train.parent.files[i] for i in splits.train.indices}
    val_files = {splits.val.parent.files[i] for i in splits.val.indices}
    assert len(train_files) + len(val_files) == 4 and not train_files & val_files
    assert len(splits.test) == 3


@pytest.mark.parametrize(
    "name",
    [
        "images.txt",
        "image_class_labels.txt",
        "train_test_split.txt",
        "bounding_boxes.txt",
        "classes.txt",
        "parts/parts.txt",
        "parts/part_locs.txt",
    ],
)
def test_missing_annotation_file_is_named(cub_root: Path, name: str) -> None:
    (cub_root / name).unlink()
    with pytest.raises(FileNotFoundError, match=Path(name).name):
        CUB200(cub_root, "train")


def test_unknown_image_id_names_file_and_line(cub_root: Path) -> None:
    set_line(cub_root / "image_class_labels.txt", 3, "99 2")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt:3: image id 99"):
        CUB200(cub_root, "train")


def test_missing_image_id_names_file(cub_root: Path) -> None:
    path = cub_root / "bounding_boxes.txt"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:-1]))
    with pytest.raises(ValueError, match=r"bounding_boxes\.txt: no line for image id\(s\) \[7\]"):
        CUB200(cub_root, "train")


@pytest.mark.parametrize(
    ("name", "line", "text", "message"),
    [
        ("image_class_labels.txt", 2, "2 4", r"image_class_labels\.txt:2: class id must lie in 1\.\.3"),
        ("train_test_split.txt", 1, "1 2", r"train_test_split\.txt:1: is_training_image"),
        ("bounding_boxes.txt", 2, "2 0.0 0.0 abc 50.0", r"bounding_boxes\.txt:2: box value must be float"),
        ("bounding_boxes.txt", 3, "3 4.0 8.0 0.5 50.0", r"bounding_boxes\.txt:3: box .* empty"),
        ("parts/part_locs.txt", 2, "1 2 35.5 12.25 2", r"part_locs\.txt:2: .*visible 0 or 1"),
        ("parts/part_locs.txt", 3, "1 2 35.5 12.25 1", r"part_locs\.txt:3: image 1 part 2 repeats line 2"),
        ("images.txt", 2, "1 001.Black_footed_Albatross/x.jpg", r"images\.txt:2: image id 1 appears twice"),
        ("classes.txt", 1, "1 001.Black footed", None),
    ],
)
def test_bad_annotation_lines_name_file_and_line(cub_root, name, line, text, message) -> None:
    set_line(cub_root / name, line, text)
    if message is None:  # names may contain spaces
        assert CUB200(cub_root, "train").classes[0] == "001.Black footed"
        return
    with pytest.raises(ValueError, match=message):
        CUB200(cub_root, "train")


def test_box_outside_the_image_is_an_error_in_crop_mode(cub_root: Path) -> None:
    set_line(cub_root / "bounding_boxes.txt", 1, "1 50.0 5.0 30.0 20.0")  # x2 = 80 > width 60
    assert CUB200(cub_root, "train").load_image(0).size == (60, 40)  # full images are unaffected
    with pytest.raises(
        ValueError, match=r"bounding_boxes\.txt:1: box .*\(50, 5, 80, 25\).*60x40 image .*0046_18"
    ):
        CUB200(cub_root, "train", crop_to_box=True).load_image(0)


def test_unreadable_or_missing_image_is_named(cub_root: Path) -> None:
    dataset = CUB200(cub_root, "train")
    path = dataset.image_path(1)
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(ValueError, match=path.name):
        dataset.load_image(1)
    dataset.image_path(2).unlink()
    with pytest.raises(FileNotFoundError, match=dataset.image_path(2).name):
        dataset.load_image(2)
    assert isinstance(dataset.load_image(0), Image.Image)


@pytest.mark.parametrize(
    ("backbone", "name"),
    [("convnext_tiny", "timm/convnext_tiny.fb_in1k"), ("resnet50", "torchvision/resnet50")],
)
def test_ready_made_configs_load(backbone: str, name: str) -> None:
    config = load_yaml(Path(__file__).parents[2] / "configs" / f"cub_{backbone}.yaml")
    assert config.data.dataset == "cub" and config.backbone.name == name
    assert config.codebook.num_prototypes == 4096 and config.head.temperature == 0.1
