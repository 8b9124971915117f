"""ImageNet-1k on miniature layouts: class folders, Kaggle (LOC_*) and devkit ground truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torchvision

from protoquant.config import load_yaml
from protoquant.data.imagenet import ImageNet
from tests.data.layouts import IMAGENET_WORDS, write_imagenet

WNIDS = ("n01440764", "n01443537", "n02102040")  # sorted
VAL_LABELS = [1, 0, 2, 0, 1]  # IMAGENET_VAL wnids of val images 1..5 as sorted-wnid indices


def test_train_class_order_matches_torchvision(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    train = ImageNet(root, "train")
    assert train.wnids == WNIDS and train.classes == WNIDS  # no metadata: names are wnids
    assert train.classes == tuple(torchvision.datasets.ImageFolder(str(root / "train")).classes)
    assert train.files[:2] == ("train/n01440764/n01440764_1000.JPEG", "train/n01440764/n01440764_1001.JPEG")
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_val_in_class_folders(tmp_path: Path) -> None:
    test = ImageNet(write_imagenet(tmp_path), "test")
    # folders sorted by wnid, files sorted: n01440764 holds val 2 and 4, n01443537 1 and 5, n02102040 3
    assert [Path(f).stem[-1] for f in test.files] == ["2", "4", "1", "5", "3"]
    assert test.labels.tolist() == [0, 0, 1, 1, 2]


def test_kaggle_layout_with_solution_csv_and_synset_names(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val="kaggle")
    train, test = ImageNet(root, "train"), ImageNet(root, "test")
    assert train.classes == tuple(IMAGENET_WORDS[w] for w in WNIDS) and train.wnids == WNIDS
    assert test.files[0] == "val/ILSVRC2012_val_00000001.JPEG"
    assert test.labels.tolist() == VAL_LABELS and test.image_path(0).is_file()
    assert ImageNet(root / "ILSVRC" / "Data" / "CLS-LOC", "train").classes == WNIDS  # no LOC files there


def test_devkit_ground_truth_maps_ids_through_meta(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val="devkit")
    test = ImageNet(root, "test")
    assert test.labels.tolist() == VAL_LABELS  # ILSVRC2012_IDs 3 2 1 2 3 are not sorted-wnid indices
    assert test.classes[0] == "tench, Tinca tinca" and test.skipped == ()
    shutil.rmtree(root / "train")  # a validation-only copy: classes from meta.mat's leaf synsets
    val_only = ImageNet(root, "test")
    assert val_only.wnids == WNIDS and val_only.labels.tolist() == VAL_LABELS


def test_flat_val_without_ground_truth_is_an_error(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val="devkit")
    shutil.rmtree(root / "ILSVRC2012_devkit_t12")
    with pytest.raises(
        FileNotFoundError, match=r"LOC_val_solution\.csv and ILSVRC2012_validation_ground_truth"
    ):
        ImageNet(root, "test")


def test_devkit_truth_needs_meta(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val="devkit")
    (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"needs meta\.mat"):
        ImageNet(root, "test")


def test_kaggle_csv_errors_name_file_and_line(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val="kaggle")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:2] + ["ILSVRC2012_val_00000009,n99999999 1 2 3 4"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"LOC_val_solution\.csv:3: wnid n99999999"):
        ImageNet(root, "test")
    csv.write_text("\n".join(lines[:-1]) + "\n")  # drops the row of val image 1
    with pytest.raises(ValueError, match=r"LOC_val_solution\.csv: no ground truth for 1 val image.*00000001"):
        ImageNet(root, "test")


def test_devkit_truth_line_errors_and_absent_images(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path, val="devkit")
    (root / "val" / "ILSVRC2012_val_00000005.JPEG").unlink()
    test = ImageNet(root, "test")
    assert len(test) == 4 and test.skipped == (
        "1 images listed in ILSVRC2012_validation_ground_truth.txt but absent from val/ were left out "
        "(e.g. ILSVRC2012_val_00000005)",
    )
    truth = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("3\n2\n4\n2\n3\n")  # id 4 is not a leaf synset
    with pytest.raises(ValueError, match=r"ground_truth\.txt:3: '4' is not an ILSVRC2012_ID of a leaf"):
        ImageNet(root, "test")


def test_non_image_files_are_counted_and_empty_classes_rejected(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    (root / "train" / "n01443537" / "readme.txt").write_text("x")
    train = ImageNet(root, "train")
    assert len(train) == 6 and train.skipped == (
        "1 non-image files in train/ left out (e.g. train/n01443537/readme.txt)",
    )
    for image in (root / "train" / "n02102040").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=r"class folder .*n02102040 holds no images"):
        ImageNet(root, "train")


def test_unknown_val_class_folder_is_an_error(tmp_path: Path) -> None:
    root = write_imagenet(tmp_path)
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(ValueError, match=r"folder .*n09999999 is not one of the 3 classes"):
        ImageNet(root, "test")


@pytest.mark.parametrize(
    ("backbone", "name"),
    [("convnext_tiny", "timm/convnext_tiny.fb_in1k"), ("resnet50", "torchvision/resnet50")],
)
def test_ready_made_configs_load(backbone: str, name: str) -> None:
    config = load_yaml(Path(__file__).parents[2] / "configs" / f"imagenet_{backbone}.yaml")
    assert config.data.dataset == "imagenet" and config.backbone.name == name
    assert config.codebook.num_prototypes == 2048 and config.head.temperature == 0.1
