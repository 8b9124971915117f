"""Stanford Cars-196 from the original devkit layout or the one torchvision's `StanfordCars` reads.

Original layout (`root/`) or torchvision layout (`root/stanford_cars/`), same files below it:
`devkit/cars_meta.mat` (`class_names`, 196 names), `devkit/cars_train_annos.mat` and
`cars_test_annos_withlabels.mat` (struct array `annotations` with fields bbox_x1, bbox_y1,
bbox_x2, bbox_y2, class, fname), images in `cars_train/` and `cars_test/`. Labels are the
devkit's 1-based class index - 1; images keep annotation order.

Boxes are taken as stored, as the crop (x1, y1, x2, y2) of common Cars pipelines. A box that
does not lie inside its image is an error at `load_image` naming the .mat file and entry
(never clipped); `data check` finds all of them. There are no part annotations: `annotations`
returns the box with zero parts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from protoquant.data.base import ImageFile, PartAnnotations
from protoquant.data.images import FileImageDataset, crop_to_box, load_mat, mat_variable, open_rgb

TORCHVISION_DIR = "stanford_cars"  # torchvision: root/stanford_cars/{devkit, cars_train, ...}
META_FILE = "devkit/cars_meta.mat"
ANNOTATION_FILES = {
    "train": ("devkit/cars_train_annos.mat",),
    "test": ("cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"),
}
IMAGE_DIRS = {"train": "cars_train", "test": "cars_test"}
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def find_cars_root(root: str | Path) -> Path:
    """The folder holding `devkit/`: `root` (original layout) or `root/stanford_cars` (torchvision)."""
    root = Path(root)
    for candidate in (root, root / TORCHVISION_DIR):
        if (candidate / META_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"Stanford Cars: {root / META_FILE} (original devkit layout) and "
        f"{root / TORCHVISION_DIR / META_FILE} (torchvision layout) not found"
    )


def find_annotation_file(base: Path, split: str) -> Path:
    """The labelled annotation file of `split`; FileNotFoundError naming every place looked at."""
    candidates = [base / name for name in ANNOTATION_FILES[split]]
    for path in candidates:
        if path.is_file():
            return path
    hint = ""
    if split == "test" and (base / "devkit" / "cars_test_annos.mat").is_file():
        hint = " (devkit/cars_test_annos.mat has no labels: cars_test_annos_withlabels.mat is needed)"
    raise FileNotFoundError(
        f"Stanford Cars {split} annotations not found: {', '.join(map(str, candidates))}{hint}"
    )


def read_class_names(path: Path) -> tuple[str, ...]:
    """The `class_names` cell array of cars_meta.mat."""
    names = tuple(str(n).strip() for n in mat_variable(load_mat(path), "class_names", path))
    if not names or any(not n for n in names):
        raise ValueError(f"{path}: class_names must be non-empty strings")
    return names


def _entry(path: Path, number: int, record: np.void, num_classes: int) -> tuple[str, int, tuple[int, ...]]:
    """(fname, 1-based class, box) of annotation `number` (1-based), validated."""
    where = f"{path}: annotation {number}"
    try:
        fname = str(record["fname"]).strip()
        label = int(record["class"])
        box = tuple(int(record[f]) for f in FIELDS[:4])
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{where}: cannot read fields ({err})") from err
    if not fname:
        raise ValueError(f"{where}: empty fname")
    if not 1 <= label <= num_classes:
        raise ValueError(f"{where} ({fname}): class {label} outside 1..{num_classes} (cars_meta.mat)")
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError(f"{where} ({fname}): box (x1, y1, x2, y2) = {box} is empty or negative")
    return fname, label, box


def read_annotations(path: Path, num_classes: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """File names, 1-based classes (N,) and boxes (N, 4) of an `annotations` struct array."""
    records = mat_variable(load_mat(path), "annotations", path)
    missing = [f for f in FIELDS if f not in (records.dtype.names or ())]
    if missing:
        raise ValueError(f"{path}: annotations lack field(s) {missing}; expected {list(FIELDS)}")
    entries = [_entry(path, n, rec, num_classes) for n, rec in enumerate(records, 1)]
    names = [e[0] for e in entries]
    first: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if name in first:
            raise ValueError(f"{path}: annotation {n} repeats fname {name} of annotation {first[name]}")
        first[name] = n
    classes = np.asarray([e[1] for e in entries], dtype=np.int64)
    boxes = np.asarray([e[2] for e in entries], dtype=np.int64).reshape(-1, 4)
    return names, classes, boxes


class StanfordCars(FileImageDataset):
    """Stanford Cars-196, official train (8,144) or test (8,041) split, optionally cropped to the box.

    Args:
        root: the folder holding `devkit/` (original) or `stanford_cars/` (torchvision).
        split: "train" or "test".
        crop_to_box: return the car's box crop; the annotation box is then the whole crop.
    """

    name = "cars"

    def __init__(self, root: str | Path, split: str = "train", *, crop_to_box: bool = False) -> None:
        if split not in IMAGE_DIRS:
            raise ValueError(f"Stanford Cars split must be one of {sorted(IMAGE_DIRS)}, got {split!r}")
        if not str(root):
            raise ValueError("Stanford Cars needs data.root: the folder holding devkit/ or stanford_cars/")
        self.base = find_cars_root(root)
        self.split, self.crop = split, crop_to_box
        self.root = self.base / IMAGE_DIRS[split]
        self.classes = read_class_names(self.base / META_FILE)
        self.annotation_file = find_annotation_file(self.base, split)
        names, class_ids, self.boxes = read_annotations(self.annotation_file, len(self.classes))
        self.files = tuple(names)
        self.labels = class_ids - 1

    @property
    def has_boxes(self) -> bool:
        return True

    def load_image(self, index: int) -> Image.Image:
        image = open_rgb(self.image_path(index), orient=False)  # annotations: stored pixels
        if not self.crop:
            return image
        where = f"{self.annotation_file}: annotation {index + 1}"
        return crop_to_box(image, self.boxes[index], where, self.image_path(index))

    def image_file(self, index: int) -> ImageFile | None:
        """The stored file, not EXIF-oriented (annotations: stored pixels); None in crop mode."""
        return None if self.crop else ImageFile(self.image_path(index), orient=False)

    def annotations(self, index: int) -> PartAnnotations:
        """No parts; the box (x1, y1, x2, y2) in `load_image(index)` pixels."""
        x1, y1, x2, y2 = self.boxes[index]
        box = (0, 0, x2 - x1, y2 - y1) if self.crop else (x1, y1, x2, y2)
        empty = np.zeros((0, 2), dtype=np.float32)
        return PartAnnotations((), empty, np.zeros(0, dtype=bool), np.asarray(box, dtype=np.float32))

    def fingerprint_extra(self) -> dict:
        return {"crop_to_box": self.crop, "boxes": self.boxes.tolist() if self.crop else None}
