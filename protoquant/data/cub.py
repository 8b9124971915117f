"""CUB-200-2011 from its official `CUB_200_2011/` folder (see METRICS.md, "Annotation layouts").

Files read (ids from 1, whitespace-separated): `images.txt`, `image_class_labels.txt`,
`train_test_split.txt`, `classes.txt`, `bounding_boxes.txt`, `parts/parts.txt`,
`parts/part_locs.txt`; images under `images/`. All seven are required: a missing one is a
FileNotFoundError naming it, and an id that does not match `images.txt` is a ValueError naming
the file and line. Images keep `images.txt` order; labels are class id - 1 (`classes.txt` order).

Crop mode (`crop_to_box=True`) follows the consistency protocol's reference code: the crop is
(int(x), int(y), int(x) + int(w), int(y) + int(h)) in original pixels, and part centres map to
x' = x - x1, y' = y - y1 in the crop's own pixels. The resize to the model's input size happens
later, in the transform, never here. A box that does not lie inside its image is an error at
`load_image` naming `bounding_boxes.txt` and the line (never clipped or padded); `data check`
finds all of them up front. Parts with visibility 0 are kept as `visible=False` (keypoint 0, 0);
visible parts keep their annotated centre even where it falls outside the crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from protoquant.data.base import ImageFile, PartAnnotations
from protoquant.data.images import FileImageDataset, crop_to_box, open_rgb, parse_number, read_rows

CUB_DIR = "CUB_200_2011"
IS_TRAIN = {"train": 1, "test": 0}  # train_test_split.txt flag of each split


@dataclass(frozen=True)
class CubTables:
    """The annotation files of CUB, validated and aligned with `images.txt` (N images, P parts)."""

    paths: tuple[str, ...]  # N paths relative to images/
    class_ids: np.ndarray  # (N,) int64, 1-based
    is_train: np.ndarray  # (N,) int64 flag, 1 = train
    boxes: np.ndarray  # (N, 4) float64 (x, y, w, h), original pixels
    box_lines: np.ndarray  # (N,) int64 line of each box in bounding_boxes.txt
    part_xy: np.ndarray  # (N, P, 2) float32 part centres (x, y), original pixels
    part_visible: np.ndarray  # (N, P) bool
    class_names: tuple[str, ...]
    part_names: tuple[str, ...]


def find_cub_root(root: str | Path) -> Path:
    """`root` itself if it holds images.txt, else `root/CUB_200_2011`; FileNotFoundError otherwise."""
    root = Path(root)
    for candidate in (root, root / CUB_DIR):
        if (candidate / "images.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"CUB-200-2011: {root / 'images.txt'} not found (nor {root / CUB_DIR / 'images.txt'})"
    )


def _ids_file(path: Path, columns: int, ids: dict[int, int]) -> dict[int, tuple[int, list[str]]]:
    """Rows of a per-image file keyed by image id, checked against the ids of images.txt."""
    rows: dict[int, tuple[int, list[str]]] = {}
    for line, fields in read_rows(path, columns):
        image_id = int(parse_number(fields[0], int, f"{path}:{line}", "image id"))
        if image_id not in ids:
            raise ValueError(f"{path}:{line}: image id {image_id} is not listed in images.txt")
        if image_id in rows:
            raise ValueError(f"{path}:{line}: image id {image_id} repeats line {rows[image_id][0]}")
        rows[image_id] = (line, fields[1:])
    missing = sorted(set(ids) - set(rows))
    if missing:
        raise ValueError(
            f"{path}: no line for image id(s) {missing[:5]} listed in images.txt ({len(missing)} missing)"
        )
    return rows


def _id_rows(path: Path, what: str) -> dict[int, str]:
    """`<id> <rest>` lines -> {id: rest}; duplicate ids and empty files are errors naming the line."""
    rows: dict[int, str] = {}
    for line, (number, rest) in read_rows(path, 2, rest=True):
        key = int(parse_number(number, int, f"{path}:{line}", what))
        if key in rows:
            raise ValueError(f"{path}:{line}: {what} {key} appears twice")
        rows[key] = rest
    if not rows:
        raise ValueError(f"{path}: no lines")
    return rows


def _numbered_names(path: Path) -> tuple[str, ...]:
    """`<id> <name>` lines with ids 1..n (any order) -> names in id order."""
    names = _id_rows(path, "id")
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ValueError(f"{path}: ids must be 1..{len(names)} without gaps, found {sorted(names)[:10]}...")
    return tuple(names[k] for k in range(1, len(names) + 1))


def _read_images(path: Path) -> dict[int, str]:
    return _id_rows(path, "image id")


def _check_part_lines(path: Path, rows: list, ids: dict[int, int], num_parts: int) -> None:
    """Find the first bad line of part_locs.txt and raise a ValueError naming it (slow path)."""
    seen = np.zeros((len(ids), num_parts), dtype=np.int64)  # line that set each entry (0 = none)
    for line, fields in rows:
        where = f"{path}:{line}"
        image_id, part, flag = (
            int(parse_number(fields[k], int, where, w))
            for k, w in ((0, "image id"), (1, "part id"), (4, "visible"))
        )
        for text in fields[2:4]:
            parse_number(text, float, where, "coordinate")
        if image_id not in ids:
            raise ValueError(f"{where}: image id {image_id} is not listed in images.txt")
        if not 1 <= part <= num_parts or flag not in (0, 1):
            raise ValueError(
                f"{where}: need part id in 1..{num_parts} and visible 0 or 1, found {part}, {flag}"
            )
        if seen[ids[image_id], part - 1]:
            raise ValueError(
                f"{where}: image {image_id} part {part} repeats line {seen[ids[image_id], part - 1]}"
            )
        seen[ids[image_id], part - 1] = line
    rows_missing, parts_missing = np.nonzero(seen == 0)
    if rows_missing.size:
        image_id = next(k for k, v in ids.items() if v == rows_missing[0])
        raise ValueError(
            f"{path}: no line for image {image_id} part {parts_missing[0] + 1} "
            f"({rows_missing.size} (image, part) pairs missing)"
        )


def _part_keys(table: np.ndarray, ids: dict[int, int], num_parts: int) -> np.ndarray | None:
    """Row-major (image row, part) index of every line, or None if any line is invalid."""
    if not np.isfinite(table).all() or (table[:, [0, 1, 4]] % 1).any():
        return None
    image_ids, parts, flags = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 4]
    if not (np.isin(image_ids, list(ids)).all() and ((parts >= 1) & (parts <= num_parts)).all()):
        return None
    if not np.isin(flags, (0, 1)).all():
        return None
    keys = np.asarray([ids[i] for i in image_ids.tolist()], dtype=np.int64) * num_parts + parts - 1
    complete = keys.size == len(ids) * num_parts and np.bincount(keys, minlength=keys.size).max() == 1
    return keys if complete else None


def _read_parts(path: Path, ids: dict[int, int], num_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """part_locs.txt -> (N, P, 2) centres and (N, P) visibility, rows ordered as `ids`."""
    rows = read_rows(path, 5)
    try:
        table = np.asarray([fields for _, fields in rows], dtype=np.float64).reshape(-1, 5)  # (R, 5)
        keys = _part_keys(table, ids, num_parts)
    except ValueError:  # a field that is not a number
        keys = None
    if keys is None:
        _check_part_lines(path, rows, ids, num_parts)
        raise ValueError(f"{path}: inconsistent part table")  # not reached: the check names the line
    visible = np.zeros(len(ids) * num_parts, dtype=bool)
    visible[keys] = table[:, 4] == 1
    xy = np.zeros((len(ids) * num_parts, 2), dtype=np.float32)
    xy[keys] = table[:, 2:4] * visible[keys, None]  # invisible parts: (0, 0)
    return xy.reshape(len(ids), num_parts, 2), visible.reshape(len(ids), num_parts)


def _box(path: Path, line: int, fields: list[str]) -> tuple[float, ...]:
    x, y, w, h = (float(parse_number(v, float, f"{path}:{line}", "box value")) for v in fields)
    if x < 0 or y < 0 or int(w) < 1 or int(h) < 1:
        raise ValueError(f"{path}:{line}: box (x, y, w, h) = ({x}, {y}, {w}, {h}) is empty or negative")
    return x, y, w, h


def _int_column(path: Path, table: dict, order: list[int], allowed: range, what: str) -> np.ndarray:
    """One integer per image (in `order`) from a per-image table, each checked against `allowed`."""
    values = []
    for image_id in order:
        line, (text,) = table[image_id]
        value = int(parse_number(text, int, f"{path}:{line}", what))
        if value not in allowed:
            raise ValueError(
                f"{path}:{line}: {what} must lie in {allowed.start}..{allowed.stop - 1}, found {value}"
            )
        values.append(value)
    return np.asarray(values, dtype=np.int64)


def read_cub(folder: Path) -> CubTables:
    """Read and cross-check every annotation file of a CUB_200_2011 folder."""
    images = _read_images(folder / "images.txt")
    order = list(images)
    ids = {image_id: row for row, image_id in enumerate(order)}  # image id -> row, images.txt order
    class_names = _numbered_names(folder / "classes.txt")
    part_names = _numbered_names(folder / "parts" / "parts.txt")
    paths = {
        name: folder / name
        for name in ("image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")
    }
    labels = _ids_file(paths["image_class_labels.txt"], 2, ids)
    split = _ids_file(paths["train_test_split.txt"], 2, ids)
    boxes = _ids_file(paths["bounding_boxes.txt"], 5, ids)
    xy, visible = _read_parts(folder / "parts" / "part_locs.txt", ids, len(part_names))
    box_path = paths["bounding_boxes.txt"]
    return CubTables(
        paths=tuple(images[i] for i in order),
        class_ids=_int_column(
            paths["image_class_labels.txt"], labels, order, range(1, len(class_names) + 1), "class id"
        ),
        is_train=_int_column(paths["train_test_split.txt"], split, order, range(2), "is_training_image"),
        boxes=np.asarray([_box(box_path, *boxes[i]) for i in order], dtype=np.float64).reshape(-1, 4),
        box_lines=np.asarray([boxes[i][0] for i in order], dtype=np.int64),
        part_xy=xy,
        part_visible=visible,
        class_names=class_names,
        part_names=part_names,
    )


class CUB200(FileImageDataset):
    """CUB-200-2011, official train (5,994) or test (5,794) split, optionally cropped to the box.

    Args:
        root: the `CUB_200_2011` folder or its parent.
        split: "train" or "test".
        crop_to_box: return the bird's box crop, with parts and box in the crop's pixels.
    """

    name = "cub"

    def __init__(self, root: str | Path, split: str = "train", *, crop_to_box: bool = False) -> None:
        if split not in IS_TRAIN:
            raise ValueError(f"CUB split must be one of {sorted(IS_TRAIN)}, got {split!r}")
        if not str(root):
            raise ValueError("CUB-200-2011 needs data.root: the CUB_200_2011 folder or its parent")
        self.folder = find_cub_root(root)
        self.root = self.folder / "images"
        self.split, self.crop = split, crop_to_box
        tables = read_cub(self.folder)
        rows = np.flatnonzero(tables.is_train == IS_TRAIN[split])
        self.files = tuple(tables.paths[i] for i in rows)
        self.labels = tables.class_ids[rows] - 1
        self.classes = tables.class_names
        self.part_names = tables.part_names
        self.boxes = tables.boxes[rows]  # (N, 4) x, y, w, h
        self.box_lines = tables.box_lines[rows]
        self.part_xy = tables.part_xy[rows]  # (N, P, 2)
        self.part_visible = tables.part_visible[rows]  # (N, P)

    @property
    def has_parts(self) -> bool:
        return True

    @property
    def has_boxes(self) -> bool:
        return True

    def crop_box(self, index: int) -> tuple[int, int, int, int]:
        """Integer crop (x1, y1, x2, y2) = (int x, int y, int x + int w, int y + int h)."""
        x, y, w, h = self.boxes[index]
        return int(x), int(y), int(x) + int(w), int(y) + int(h)

    def load_image(self, index: int) -> Image.Image:
        image = open_rgb(self.image_path(index), orient=False)  # annotations: stored pixels
        if not self.crop:
            return image
        where = f"{self.folder / 'bounding_boxes.txt'}:{self.box_lines[index]}"
        return crop_to_box(image, self.crop_box(index), where, self.image_path(index))

    def image_file(self, index: int) -> ImageFile | None:
        """The stored file, not EXIF-oriented (annotations: stored pixels); None in crop mode."""
        return None if self.crop else ImageFile(self.image_path(index), orient=False)

    def annotations(self, index: int) -> PartAnnotations:
        """15 part centres (x, y) and the box (x1, y1, x2, y2), in `load_image(index)` pixels."""
        visible = self.part_visible[index].copy()
        keypoints = self.part_xy[index].copy()  # (P, 2)
        if self.crop:
            x1, y1, x2, y2 = self.crop_box(index)
            keypoints[visible] -= np.array([x1, y1], dtype=np.float32)
            box = np.array([0, 0, x2 - x1, y2 - y1], dtype=np.float32)
        else:
            x, y, w, h = self.boxes[index]
            box = np.array([x, y, x + w, y + h], dtype=np.float32)
        return PartAnnotations(self.part_names, keypoints, visible, box)

    def fingerprint_extra(self) -> dict:
        return {"crop_to_box": self.crop, "boxes": self.boxes.tolist() if self.crop else None}
