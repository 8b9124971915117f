"""What a downscaled copy (`protoquant.data.resize`) must change besides the pixels, per layout.

A copy is only another dataset if its annotations still point at the same pixels:

| layout | annotations | in the copy |
|---|---|---|
| `cub` | `bounding_boxes.txt` (x, y, w, h) and `parts/part_locs.txt` (x, y), stored pixels | every coordinate times its image's scale (x by new width / old width, y by new height / old height), two decimals |
| `cars` | the `annotations` of `devkit/cars_train_annos.mat`, `cars_test_annos_withlabels.mat` (either place) and `devkit/cars_test_annos.mat`: integer boxes (x1, y1, x2, y2), stored pixels | scaled the same way, rounded, and kept inside the image |
| `imagenet` | the Kaggle `LOC_val_solution.csv` / `LOC_train_solution.csv` boxes (`wnid x1 y1 x2 y2 ...` per image), stored pixels | scaled like the Cars boxes (the labels, read from the same file, are kept) |
| `imagenet` | the PASCAL VOC XML files of `ILSVRC/Annotations/CLS-LOC/` (one per image: `<size>` and the `<bndbox>` of each object), stored pixels | each file after its image (same relative path under `ILSVRC/Data/CLS-LOC/`): `<size>` becomes the copy's, the boxes are scaled like the Cars boxes; every other element and its text as read |
| `funnybirds` | colour-coded part maps `{split}_part_map/` | resized by nearest neighbour, so every pixel keeps an exact part colour (thin parts keep fewer pixels: on the shared FunnyBirds subset at 256 -> 128 px, part centroids moved by a median 0.25 % of the side, a foot by 3.5 % at worst) |
| others | none in pixels | nothing |

The scale of each image is read from the headers of its original and its copy, so a resumed
run, whose images were written by an earlier one, rescales the same way. The rewritten
annotation files are never copied as they are: they are written, atomically, once every image
is, so a copy that a crash stopped part-way has no annotation file rather than a wrong one.
Per-image annotation files (ImageNet's XML) are written once every image is too, each after its
image, and count as done only when newer than both their source and their image's copy.
A line or entry that cannot be read is copied unchanged for the dataset's loader to report (an
XML file that does not parse, or whose image is missing, as it is).
"""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from protoquant.atomic import write_bytes_atomic, write_file_atomic
from protoquant.data.cars import ANNOTATION_FILES as CARS_ANNOTATION_FILES
from protoquant.data.cars import IMAGE_DIRS as CARS_IMAGE_DIRS
from protoquant.data.cars import find_cars_root
from protoquant.data.cub import find_cub_root
from protoquant.data.detect import detect_dataset
from protoquant.data.imagenet import KAGGLE_SOLUTION, find_images_root, find_meta
from protoquant.data.images import load_mat

CUB_BOXES = "bounding_boxes.txt"
CUB_PARTS = "parts/part_locs.txt"
CARS_UNLABELLED_TEST = "devkit/cars_test_annos.mat"  # the devkit's test boxes without classes
CARS_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
IMAGENET_TRAIN_SOLUTION = "LOC_train_solution.csv"  # Kaggle: train boxes, same format as val
IMAGENET_EXTENSION = ".JPEG"  # ImageId + this is the image file
IMAGENET_XML = ".xml"  # Kaggle: Annotations/CLS-LOC/<path>.xml: boxes of Data/CLS-LOC/<path>.JPEG
VOC_BOX = (("xmin", 0), ("ymin", 1), ("xmax", 0), ("ymax", 1))  # <bndbox> children and their axis
PART_MAP_SUFFIX = "_part_map"  # FunnyBirds: {split}_part_map/ holds colour-coded label images

Scale = tuple[float, float]  # (new width / old width, new height / old height)
Sizes = tuple[tuple[int, int], tuple[int, int]]  # (width, height) of an image and of its copy


@dataclass(frozen=True)
class LayoutRules:
    """How one layout's copy differs from a plain image tree.

    `rewritten`: paths (relative to the source) written by `rewrite(src, dst)` after the images,
    never copied; `label_image(rel)`: whether an image is a label map (resized by nearest
    neighbour); `annotates(rel)`: for a file of one image's annotations, that image (relative to
    the source; None for other files), the file then written by `rewrite_one(src file, dst file,
    sizes of the image and its copy, or None)` after the images.
    """

    rewritten: frozenset[Path] = frozenset()
    rewrite: Callable[[Path, Path], None] = lambda src, dst: None
    label_image: Callable[[Path], bool] = lambda rel: False
    annotates: Callable[[Path], Path | None] = lambda rel: None
    rewrite_one: Callable[[Path, Path, Sizes | None], None] = lambda src, dst, sizes: None


def layout_rules(src: Path) -> LayoutRules:
    """The rules of the layout `detect_dataset` finds in `src`."""
    layout = detect_dataset(src)
    if layout == "cub":
        return _cub_rules(src)
    if layout == "cars":
        return _cars_rules(src)
    if layout == "imagenet":
        return _imagenet_rules(src)
    if layout == "funnybirds":
        return LayoutRules(label_image=lambda rel: any(p.endswith(PART_MAP_SUFFIX) for p in rel.parts[:-1]))
    return LayoutRules()


def image_sizes(old: Path, new: Path) -> Sizes | None:
    """(width, height) of `old` and of its copy `new` (stored pixels); None if either cannot be read."""
    try:
        with Image.open(old) as before, Image.open(new) as after:
            return before.size, after.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


class _Sizes:
    """Sizes of the images under one folder of the source and of the copy, each read once."""

    def __init__(self, src_images: Path, dst_images: Path) -> None:
        self.src, self.dst, self.known = src_images, dst_images, {}

    def __call__(self, rel: str) -> Sizes | None:
        if rel not in self.known:
            self.known[rel] = image_sizes(self.src / rel, self.dst / rel)
        return self.known[rel]

    def scale(self, rel: str | None) -> Scale | None:
        """Per-axis scale from the original of `rel` to its copy."""
        sizes = self(rel) if rel else None
        return None if sizes is None else (sizes[1][0] / sizes[0][0], sizes[1][1] / sizes[0][1])


def _scaled_pixel(value: float, old: int, new: int) -> int:
    """An integer box coordinate on an axis of `old` pixels moved to `new` pixels: rounded, inside."""
    return min(max(round(value * new / old), 0), new)


# ---- CUB-200-2011 -------------------------------------------------------------------------


def _cub_rules(src: Path) -> LayoutRules:
    base = find_cub_root(src).relative_to(src)
    return LayoutRules(
        rewritten=frozenset({base / CUB_BOXES, base / CUB_PARTS}),
        rewrite=lambda s, d: _rewrite_cub(s / base, d / base),
    )


def _cub_image_paths(folder: Path) -> dict[str, str]:
    """images.txt as {image id (text): relative path}; unreadable lines are left out."""
    paths = {}
    for line in (folder / "images.txt").read_text(encoding="utf-8").splitlines():
        fields = line.strip().split(None, 1)
        if len(fields) == 2:
            paths[fields[0]] = fields[1]
    return paths


def _scaled_line(line: str, scale: Scale | None, columns: dict[int, int]) -> str:
    """`line` with field i multiplied by the scale of axis columns[i]; unchanged if unreadable."""
    fields = line.split()
    if scale is None or len(fields) <= max(columns):
        return line
    try:
        for i, axis in columns.items():
            fields[i] = f"{float(fields[i]) * scale[axis]:.2f}"
    except ValueError:
        return line
    return " ".join(fields)


def _rewrite_cub(src: Path, dst: Path) -> None:
    """bounding_boxes.txt (id x y w h) and part_locs.txt (id part x y visible) in the copy's pixels."""
    paths = _cub_image_paths(src)
    sizes = _Sizes(src / "images", dst / "images")
    for name, columns in ((CUB_BOXES, {1: 0, 2: 1, 3: 0, 4: 1}), (CUB_PARTS, {2: 0, 3: 1})):
        lines = []
        for line in (src / name).read_text(encoding="utf-8").splitlines():
            fields = line.split()
            scale = sizes.scale(paths.get(fields[0]) if fields else None)
            lines.append(_scaled_line(line, scale, columns))
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dst / name, "".join(f"{line}\n" for line in lines).encode())


# ---- Stanford Cars ------------------------------------------------------------------------


def _cars_files(base: Path) -> dict[str, str]:
    """{annotation file relative to the devkit base: image folder} for the files present."""
    names = {name: CARS_IMAGE_DIRS[split] for split, files in CARS_ANNOTATION_FILES.items() for name in files}
    names[CARS_UNLABELLED_TEST] = CARS_IMAGE_DIRS["test"]
    return {name: folder for name, folder in names.items() if (base / name).is_file()}


def _cars_rules(src: Path) -> LayoutRules:
    base = find_cars_root(src).relative_to(src)
    files = _cars_files(src / base)

    def rewrite(src: Path, dst: Path) -> None:
        for name, images in files.items():
            _rewrite_cars(
                src / base / name, dst / base / name, _Sizes(src / base / images, dst / base / images)
            )

    return LayoutRules(rewritten=frozenset(base / name for name in files), rewrite=rewrite)


def _scale_box(record: np.void, sizes: Sizes) -> None:
    """Scale the box fields of one `annotations` record in place: rounded, inside the copy."""
    (old_w, old_h), (new_w, new_h) = sizes
    for name, (old, new) in zip(CARS_BOX_FIELDS, ((old_w, new_w), (old_h, new_h)) * 2):
        stored = np.asarray(record[name])
        value = _scaled_pixel(float(stored.reshape(-1)[0]), old, new)
        record[name] = np.full(stored.shape, value, dtype=stored.dtype)


def _rewrite_cars(src: Path, dst: Path, sizes: _Sizes) -> None:
    """One annotation .mat file with its boxes in the copy's pixels (every other variable as read)."""
    mat = load_mat(src, squeeze=False)
    records = mat.get("annotations")
    names = getattr(getattr(records, "dtype", None), "names", None) or ()
    if all(f in names for f in (*CARS_BOX_FIELDS, "fname")):
        for record in records.reshape(-1):
            found = sizes(str(np.asarray(record["fname"]).reshape(-1)[0]).strip())
            if found is not None:
                _scale_box(record, found)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {k: v for k, v in mat.items() if not k.startswith("__")})
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(dst, buffer.getvalue())


# ---- ImageNet (Kaggle box files) ----------------------------------------------------------


def _imagenet_rules(src: Path) -> LayoutRules:
    try:
        images = find_images_root(src)
    except FileNotFoundError:
        return LayoutRules()  # no image folders: nothing to rescale against
    files = {
        path.relative_to(src): split
        for name, split in ((KAGGLE_SOLUTION, "val"), (IMAGENET_TRAIN_SOLUTION, "train"))
        if (path := find_meta(src, name)) is not None
    }

    def rewrite(src_root: Path, dst_root: Path) -> None:
        folder = images.relative_to(src)
        for rel, split in files.items():
            sizes = _Sizes(src_root / folder / split, dst_root / folder / split)
            _rewrite_solution(src_root / rel, dst_root / rel, sizes, split)

    data = images.relative_to(src)  # ILSVRC/Data/CLS-LOC in the Kaggle layout
    xml = data.parents[1] / "Annotations" / data.name if data.parent.name == "Data" else None

    def annotates(rel: Path) -> Path | None:
        if xml is None or rel.suffix != IMAGENET_XML or not rel.is_relative_to(xml):
            return None
        return (data / rel.relative_to(xml)).with_suffix(IMAGENET_EXTENSION)

    return LayoutRules(
        rewritten=frozenset(files), rewrite=rewrite, annotates=annotates, rewrite_one=_rewrite_voc
    )


def _rewrite_voc(src: Path, dst: Path, sizes: Sizes | None) -> None:
    """A PASCAL VOC XML file with `<size>` and every `<bndbox>` in the copy's pixels.

    The numbers are scaled like the Kaggle boxes (`_scaled_pixel`), so both files of the copy
    agree as they do in the original; a file that does not parse, or has no image, is copied.
    """
    data = src.read_bytes()
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        root = None
    if root is not None and sizes is not None:
        for tag, side in zip(("size/width", "size/height"), sizes[1]):
            if (element := root.find(tag)) is not None:
                element.text = str(side)
        for box in root.iter("bndbox"):
            for tag, axis in VOC_BOX:
                element = box.find(tag)
                try:
                    value = float(element.text) if element is not None and element.text else None
                except ValueError:
                    value = None
                if value is not None:  # else missing or not a number: left for whoever reads it
                    element.text = str(_scaled_pixel(value, sizes[0][axis], sizes[1][axis]))
        declared = data.lstrip().startswith(b"<?xml")
        data = ElementTree.tostring(root, encoding="utf-8", xml_declaration=declared)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(dst, lambda tmp: tmp.write_bytes(data), durable=False)


def _scaled_prediction(text: str, sizes) -> str:
    """`wnid x1 y1 x2 y2 ...` with every box in the copy's pixels (rounded, inside the image)."""
    fields = text.split()
    if sizes is None or len(fields) % 5:
        return text
    (old_w, old_h), (new_w, new_h) = sizes
    try:
        for start in range(0, len(fields), 5):
            for offset, (old, new) in zip(range(1, 5), ((old_w, new_w), (old_h, new_h)) * 2):
                fields[start + offset] = str(_scaled_pixel(float(fields[start + offset]), old, new))
    except ValueError:
        return text
    return " ".join(fields)


def _rewrite_solution(src: Path, dst: Path, sizes: _Sizes, split: str) -> None:
    """A Kaggle `ImageId,PredictionString` file with its boxes in the copy's pixels."""
    with src.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for number, row in enumerate(rows):
        if number and len(row) == 2:
            image, wnid = row[0].strip(), (row[1].split() or [""])[0]
            folder = image.split("_")[0] if split == "train" else wnid  # val: flat, or in class folders
            found = sizes(image + IMAGENET_EXTENSION) or sizes(f"{folder}/{image}{IMAGENET_EXTENSION}")
            row = [row[0], _scaled_prediction(row[1], found)]
        writer.writerow(row)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(dst, out.getvalue().encode())
