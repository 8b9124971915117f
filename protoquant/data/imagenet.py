"""ImageNet-1k (ILSVRC 2012): `train/<wnid>/*.JPEG`, and `val/` in class folders or flat.

`root` holds `train/` and `val/` (or is the Kaggle download, whose images sit in
`ILSVRC/Data/CLS-LOC/`). The "test" split is the official validation set. Class order is the
sorted wnids (torchvision `ImageFolder` and timm order): the folders of `train/`, else the wnids
of `LOC_synset_mapping.txt`, else the leaf synsets of the devkit's `meta.mat`, else the folders
of `val/`. Class names are human readable where `LOC_synset_mapping.txt` (`n01440764 tench,
Tinca tinca`) or `meta.mat` is found, else the wnids (`wnids` always holds them). Note that
ImageNet itself names two classes "crane" and two "maillot".

A flat `val/` needs ground truth, looked for in `root`, `root/devkit` and
`root/ILSVRC2012_devkit_t12/data`: `LOC_val_solution.csv` (Kaggle: `ImageId,PredictionString`,
the first token the wnid) or `ILSVRC2012_validation_ground_truth.txt` (line n: the 1-based
ILSVRC2012_ID of `ILSVRC2012_val_<n:08d>`, mapped to a wnid by `meta.mat`). Files without an
image extension, and ground-truth rows whose image is absent, are left out, counted in
`skipped`, logged and reported by `data check`; an image without ground truth is an error.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from protoquant.data.base import display_name
from protoquant.data.images import FileImageDataset, is_image_file, load_mat, mat_variable, read_rows

KAGGLE_IMAGES = Path("ILSVRC") / "Data" / "CLS-LOC"  # Kaggle download: images below this
META_DIRS = ("", "devkit", "ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12")  # relative to root
SYNSET_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_HEADER = ["ImageId", "PredictionString"]
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")  # devkit ground-truth line n <-> ILSVRC2012_val_<n:08d>
EXAMPLES = 3  # file names quoted in a note about left-out files


def find_images_root(root: Path) -> Path:
    """The folder holding train/ and val/: `root` or the Kaggle `root/ILSVRC/Data/CLS-LOC`."""
    for candidate in (root, root / KAGGLE_IMAGES):
        if (candidate / "train").is_dir() or (candidate / "val").is_dir():
            return candidate
    raise FileNotFoundError(f"ImageNet: no train/ or val/ folder in {root} (nor in {root / KAGGLE_IMAGES})")


def find_meta(root: Path, name: str) -> Path | None:
    """First `name` in the metadata folders of `root`, or None."""
    return next((root / d / name for d in META_DIRS if (root / d / name).is_file()), None)


def _note(count: int, what: str, examples: list[str]) -> list[str]:
    shown = ", ".join(display_name(e) for e in examples[:EXAMPLES])
    return [f"{count} {what} left out (e.g. {shown})"] if count else []


def list_images(folder: Path, prefix: str = "") -> tuple[list[str], list[str]]:
    """Sorted image files directly in `folder` as `prefix + name`, and the non-image names."""
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file())
    images = [prefix + n for n in names if is_image_file(n)]
    return images, [prefix + n for n in names if not is_image_file(n)]


def class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def read_synset_mapping(path: Path) -> dict[str, str]:
    """`<wnid> <names>` lines -> {wnid: names}."""
    mapping: dict[str, str] = {}
    for line, (wnid, names) in read_rows(path, 2, rest=True):
        if wnid in mapping:
            raise ValueError(f"{path}:{line}: wnid {wnid} appears twice")
        mapping[wnid] = names
    return mapping


def read_devkit_meta(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """meta.mat leaf synsets -> ({ILSVRC2012_ID: wnid}, {wnid: words})."""
    synsets = mat_variable(load_mat(path), "synsets", path)
    fields = ("ILSVRC2012_ID", "WNID", "words", "num_children")
    missing = [f for f in fields if f not in (synsets.dtype.names or ())]
    if missing:
        raise ValueError(f"{path}: synsets lack field(s) {missing}")
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    words = {str(s["WNID"]): str(s["words"]) for s in leaves}
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}, words


def read_kaggle_solution(path: Path, index: dict[str, int]) -> dict[str, int]:
    """LOC_val_solution.csv -> {ImageId: label}; the first token of PredictionString is the wnid."""
    truth: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        if next(reader, None) != KAGGLE_HEADER:
            raise ValueError(f"{path}:1: expected the header {','.join(KAGGLE_HEADER)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) != 2 or not row[1].split():
                raise ValueError(f"{where}: expected 'ImageId,<wnid> ...', found {row}")
            wnid = row[1].split()[0]
            if wnid not in index:
                raise ValueError(f"{where}: wnid {wnid} is not one of the {len(index)} classes")
            if row[0] in truth:
                raise ValueError(f"{where}: ImageId {row[0]} appears twice")
            truth[row[0]] = index[wnid]
    return truth


def read_devkit_truth(path: Path, meta: Path, index: dict[str, int]) -> dict[str, int]:
    """ILSVRC2012_validation_ground_truth.txt -> {ILSVRC2012_val_<n:08d>: label}."""
    id_to_wnid, _ = read_devkit_meta(meta)
    truth: dict[str, int] = {}
    for line, (text,) in read_rows(path, 1):
        if not text.isdigit() or int(text) not in id_to_wnid:
            raise ValueError(f"{path}:{line}: {text!r} is not an ILSVRC2012_ID of a leaf synset in {meta}")
        wnid = id_to_wnid[int(text)]
        if wnid not in index:
            raise ValueError(f"{path}:{line}: wnid {wnid} (ILSVRC2012_ID {text}) is not one of the classes")
        truth[f"ILSVRC2012_val_{line:08d}"] = index[wnid]
    return truth


class ImageNet(FileImageDataset):
    """ImageNet-1k, "train" (1,281,167 images) or "test" (the 50,000 official validation images).

    Args:
        root: the folder holding train/ and val/, or the Kaggle download folder.
        split: "train" or "test".
    """

    name = "imagenet"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"ImageNet split must be 'train' or 'test' (the official val), got {split!r}")
        if not str(root):
            raise ValueError("ImageNet needs data.root: the folder holding train/ and val/")
        self.meta_root = Path(root)
        self.root = find_images_root(self.meta_root)
        self.split = split
        self.wnids = self._wnids()
        index = {w: i for i, w in enumerate(self.wnids)}
        if split == "train":
            files, labels, notes = self._folders("train", index)
        elif not (self.root / "val").is_dir():
            raise FileNotFoundError(f"ImageNet: validation folder {self.root / 'val'} not found")
        elif class_folders(self.root / "val"):
            files, labels, notes = self._folders("val", index)
        else:
            files, labels, notes = self._flat_val(index)
        self.files, self.labels = tuple(files), np.asarray(labels, dtype=np.int64)
        self.classes = self._names()
        self._report_skipped(notes)

    def _wnids(self) -> tuple[str, ...]:
        """Sorted wnids from the first source found (see the module docstring)."""
        if (self.root / "train").is_dir():
            return tuple(class_folders(self.root / "train"))
        mapping, meta = find_meta(self.meta_root, SYNSET_MAPPING), find_meta(self.meta_root, DEVKIT_META)
        if mapping:
            return tuple(sorted(read_synset_mapping(mapping)))
        if meta:
            return tuple(sorted(read_devkit_meta(meta)[1]))
        if (self.root / "val").is_dir() and class_folders(self.root / "val"):
            return tuple(class_folders(self.root / "val"))
        raise FileNotFoundError(
            f"ImageNet: cannot tell the classes: no {self.root / 'train'} folders, {SYNSET_MAPPING}, "
            f"{DEVKIT_META} or {self.root / 'val'} class folders"
        )

    def _names(self) -> tuple[str, ...]:
        mapping, meta = find_meta(self.meta_root, SYNSET_MAPPING), find_meta(self.meta_root, DEVKIT_META)
        names = read_synset_mapping(mapping) if mapping else read_devkit_meta(meta)[1] if meta else {}
        return tuple(names.get(w, display_name(w)) for w in self.wnids)  # a folder name as text

    def _folders(self, top: str, index: dict[str, int]) -> tuple[list[str], list[int], list[str]]:
        """Images of `top/<wnid>/`, labelled by wnid."""
        files, labels, others = [], [], []
        for wnid in class_folders(self.root / top):
            if wnid not in index:
                raise ValueError(
                    f"ImageNet: folder {self.root / top / wnid} is not one of the {len(index)} classes"
                )
            images, rest = list_images(self.root / top / wnid, f"{top}/{wnid}/")
            if not images and top == "train":
                raise ValueError(f"ImageNet: class folder {self.root / top / wnid} holds no images")
            files += images
            labels += [index[wnid]] * len(images)
            others += rest
        return files, labels, _note(len(others), f"non-image files in {top}/", others)

    def _flat_val(self, index: dict[str, int]) -> tuple[list[str], list[int], list[str]]:
        """Flat val/ images labelled by the Kaggle solution or the devkit ground truth."""
        solution = find_meta(self.meta_root, KAGGLE_SOLUTION)
        truth_file = find_meta(self.meta_root, DEVKIT_TRUTH)
        if solution:
            source, truth = solution, read_kaggle_solution(solution, index)
        elif truth_file:
            meta = find_meta(self.meta_root, DEVKIT_META)
            if meta is None:
                raise FileNotFoundError(
                    f"ImageNet: {truth_file} needs {DEVKIT_META} next to it to map ids to wnids"
                )
            source, truth = truth_file, read_devkit_truth(truth_file, meta, index)
        else:
            raise FileNotFoundError(
                f"ImageNet: {self.root / 'val'} is flat and no ground truth was found: looked for "
                f"{KAGGLE_SOLUTION} and {DEVKIT_TRUTH} in {', '.join(str(self.meta_root / d) for d in META_DIRS)}"
            )
        files, others = list_images(self.root / "val", "val/")
        stems = [Path(f).stem for f in files]
        unlabelled = [f for f, s in zip(files, stems) if s not in truth]
        if unlabelled:
            raise ValueError(
                f"{source}: no ground truth for {len(unlabelled)} val image(s), e.g. {unlabelled[:EXAMPLES]}"
            )
        absent = sorted(set(truth) - set(stems))
        notes = _note(len(others), "non-image files in val/", others)
        notes += _note(len(absent), f"images listed in {source.name} but absent from val/ were", absent)
        return files, [truth[s] for s in stems], notes
