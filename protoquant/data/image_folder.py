"""Your own images: `root/<class>/<image>`, optionally split into `train/`, `val/` and `test/`.

Classes are the sorted names of the class folders (torchvision `ImageFolder` order) of the
training source, as text (`base.display_name`: bytes that are not UTF-8 read as escapes such
as "caf\\xe9"; image paths keep the real names); images are the files with an image extension
(`images.IMAGE_EXTENSIONS`, any case), sorted, nested folders included. The layout decides the
splits (`split_sources`):

- `root/<class>/*`: one pool; a seeded (`split_seed`), stratified `test_fraction` of every
  class is carved out as the test split, the rest is train.
- `root/train/<class>/*` with `test/` and/or `val/` beside it: with `test/`, test/ is the test
  split and a `val/` is the validation split (`load_splits` then carves nothing); with `val/`
  only, val/ is held out and evaluated as the test split, and validation is carved from train
  as usual, so the reported accuracy is still measured on images no model selection saw.
- a split file (`data.split_file`, relative to `root` or absolute): one image per line,
  `<path relative to root> <train|val|test>` (the path may contain spaces; the split is the
  last word; blank lines and lines starting with `#` are ignored), classes the folders of
  `root`, splits mapped by the same rules. A listed file that does not exist or is not inside
  a class folder, or a file listed twice, is an error naming the split file and line; images on
  disk that the split file does not list are left out, counted in `skipped`, logged and reported.

A class folder of val/ or test/ unknown to train/ is an error; a training class without images
in a split is reported the same way as left-out files, which are counted, logged and reported
by `protoquant data check`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from protoquant.data.base import display_name, display_names
from protoquant.data.images import IMAGE_EXTENSIONS, FileImageDataset, is_image_file
from protoquant.data.splits import stratified_split
from protoquant.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COMMENT = "#"  # split-file lines starting with this are ignored
EXAMPLES = 3  # file names quoted in a note about left-out files
CARVED = "carved"  # source of a test split carved out of the training pool


def walk_images(folder: Path) -> tuple[list[str], list[str]]:
    """Image files below `folder` (recursively) and the other files, as sorted POSIX relative paths."""
    images, others = [], []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = (Path(parent) / name).relative_to(folder).as_posix()
            (images if is_image_file(name) else others).append(rel)
    return sorted(images), sorted(others)


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of `folder`."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _note(paths: list[str], what: str) -> list[str]:
    examples = ", ".join(display_name(p) for p in paths[:EXAMPLES])
    return [f"{len(paths)} {what} left out (e.g. {examples})"] if paths else []


def split_sources(present: set[str], where: str) -> dict[str, str]:
    """Which source (a folder or split-file word, or `CARVED`) serves each of train, val, test.

    Args:
        present: the split names the layout holds (folders of the root, or words of a split file).
        where: the root or split file, for the error message.
    """
    if "train" not in present:
        found = ", ".join(sorted(present)) or "nothing"
        raise ValueError(f"image-folder {where}: a 'train' split is needed beside {found}")
    if "test" in present:
        return {"train": "train", "test": "test", **({"val": "val"} if "val" in present else {})}
    if "val" in present:  # held out and evaluated; validation is carved from train
        return {"train": "train", "test": "val"}
    return {"train": "train", "test": CARVED}


def folder_layout(root: Path, split_file: str | Path = "") -> dict[str, str]:
    """`split_sources` of an image folder: by its split file, its split folders, or one pool."""
    if split_file:
        path = root / split_file
        return split_sources(_split_words(path), str(path))
    present = {s for s in SPLITS if (root / s).is_dir()}
    return split_sources(present, str(root)) if present else {"train": "train", "test": CARVED}


def _split_words(path: Path) -> set[str]:
    """The split words a split file uses (its lines are checked by `read_split_file`)."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    lines = (raw.strip() for raw in _split_lines(path))
    return {text.rsplit(None, 1)[-1] for text in lines if text and not text.startswith(COMMENT)}


def _split_lines(path: Path) -> list[str]:
    """The lines of a split file, which must be UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"split file {path} is not UTF-8 text (byte {err.start}): {err.reason}") from err


def read_split_file(path: Path, root: Path, classes: list[str]) -> dict[str, str]:
    """{relative path: split} of a split file, each path checked to exist inside a class folder."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    listed: dict[str, tuple[str, int]] = {}
    for line, raw in enumerate(_split_lines(path), 1):
        text = raw.strip()
        if not text or text.startswith(COMMENT):
            continue
        fields = text.rsplit(None, 1)
        if len(fields) != 2 or fields[1] not in SPLITS:
            raise ValueError(f"{path}:{line}: expected '<relative path> <train|val|test>', found {text!r}")
        rel = Path(fields[0]).as_posix()
        if rel in listed:
            raise ValueError(f"{path}:{line}: {rel} is already listed on line {listed[rel][1]}")
        if rel.split("/")[0] not in classes or "/" not in rel:
            raise ValueError(f"{path}:{line}: {rel} is not inside a class folder of {root}")
        if not (root / rel).is_file():
            raise ValueError(f"{path}:{line}: listed image {root / rel} does not exist")
        listed[rel] = (fields[1], line)
    return {rel: split for rel, (split, _) in listed.items()}


class ImageFolder(FileImageDataset):
    """A labelled folder of images: its "train", "val" or "test" split (see the module docstring).

    Args:
        root: the dataset folder.
        split: "train", "test", or "val" where the layout has a validation split.
        split_file: optional split file (relative to `root` or absolute).
        test_fraction: share of every class carved out as test where the layout has no test split.
        split_seed: seeds that carving.
    """

    name = "image-folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        split_file: str | Path = "",
        test_fraction: float = 0.2,
        split_seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"image-folder split must be one of {list(SPLITS)}, got {split!r}")
        if not str(root) or not Path(root).is_dir():
            raise FileNotFoundError(f"image-folder: data.root {str(root)!r} is not a folder")
        self.root, self.split = Path(root), split
        self.layout = folder_layout(self.root, split_file)
        if split not in self.layout:
            raise ValueError(
                f"image-folder {self.root} has no {split} split (it has {', '.join(self.layout)})"
            )
        self.source = self.layout[split]
        self._carve = (test_fraction, split_seed) if self.layout["test"] == CARVED else None
        read_from = "train" if self.source == CARVED else self.source  # a carved test lies in train
        if split_file:
            files, labels, notes = self._from_split_file(self.root / split_file, read_from)
        elif (self.root / "train").is_dir():
            files, labels, notes = self._from_split_folders(read_from)
            self.root = self.root / read_from
        else:
            files, labels, notes = self._from_pool(self.root, self._set_classes(self.root), "non-image files")
        if not files and (split == "train" or self._carve is not None):  # a carved split lies in train
            raise DataError(
                f"image-folder {self.root}: no training images in its class folders (looked for "
                f"{' '.join(IMAGE_EXTENSIONS)}, any case)"
            )
        files, labels = self._carved(files, labels)
        self.files, self.labels = tuple(files), np.asarray(labels, dtype=np.int64)
        empty = [c for i, c in enumerate(self.classes) if not (self.labels == i).any()]
        if empty:
            notes.append(f"{len(empty)} class(es) without {split} images: {', '.join(empty[:EXAMPLES])}")
        self._report_skipped(notes)

    def fingerprint_extra(self) -> dict:
        """Where the split comes from, where that is not simply the folder or split word it is named."""
        extra: dict = {"source": self.source} if self.source != self.split else {}
        return {**extra, "carve": list(self._carve)} if self._carve else extra

    def _set_classes(self, folder: Path) -> dict[str, int]:
        classes = class_folders(folder)
        if not classes:
            raise ValueError(
                f"image-folder: {folder} holds no class folders; expected {folder}/<class>/<image> "
                "(or train/, with val/ and/or test/ beside it, each holding class folders)"
            )
        self.classes = display_names(classes, str(folder))  # the folder names, shown as text
        return {c: i for i, c in enumerate(classes)}  # the real names: they build the paths

    def _carved(self, files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
        """The train or test share of a training pool whose test split is carved out of it."""
        if self._carve is None or self.split not in ("train", "test"):
            return files, labels
        fraction, seed = self._carve
        kept, held = stratified_split(np.asarray(labels, dtype=np.int64), fraction, seed)
        chosen = held if self.split == "test" else kept
        return [files[i] for i in chosen], [labels[i] for i in chosen]

    def _from_pool(
        self, folder: Path, index: dict[str, int], others_note: str
    ) -> tuple[list[str], list[int], list[str]]:
        """Every image below the class folders `index` of `folder`, and a note on the other files."""
        files, labels, others = [], [], []
        for name in index:
            images, rest = walk_images(folder / name)
            files += [f"{name}/{r}" for r in images]
            labels += [index[name]] * len(images)
            others += [f"{name}/{r}" for r in rest]
        return files, labels, _note(others, others_note)

    def _from_split_file(self, path: Path, source: str) -> tuple[list[str], list[int], list[str]]:
        index = self._set_classes(self.root)
        listed = read_split_file(path, self.root, list(index))
        files = sorted(rel for rel, s in listed.items() if s == source)
        unlisted, others = [], []
        for name in index:
            images, rest = walk_images(self.root / name)
            unlisted += [f"{name}/{r}" for r in images if f"{name}/{r}" not in listed]
            others += [f"{name}/{r}" for r in rest]
        notes = _note(unlisted, f"images not listed in {path.name} were") + _note(others, "non-image files")
        return files, [index[f.split("/")[0]] for f in files], notes

    def _from_split_folders(self, source: str) -> tuple[list[str], list[int], list[str]]:
        index = self._set_classes(self.root / "train")
        folder = self.root / source
        for name in class_folders(folder):
            if name not in index:
                raise ValueError(
                    f"image-folder: class folder {folder / name} does not exist in {self.root / 'train'}"
                )
        present = {c: i for c, i in index.items() if (folder / c).is_dir()}
        return self._from_pool(folder, present, f"non-image files in {source}/")
