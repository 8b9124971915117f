"""Image folders: `root/<class>/<image>`, split by a split file or by `root/{train,test}/<class>/`.

Classes are the sorted names of the class folders (torchvision `ImageFolder` order); images
are the files with an image extension (`images.IMAGE_EXTENSIONS`, any case), sorted, nested
folders included. Two ways to say which image belongs to which split:

- a split file (`data.split_file`, relative to `root` or absolute): one image per line,
  `<path relative to root> <train|test>`; the path may contain spaces (the split is the last
  word); blank lines and lines starting with `#` are ignored. Classes are the folders of
  `root`. A listed file that does not exist, or that is not inside a class folder, is an error
  naming the split file and line; a file listed twice is an error; images on disk that the
  split file does not list are left out, counted in `skipped`, logged and reported.
- otherwise `root/train/<class>/` and `root/test/<class>/`; the classes are those of train/,
  and a test class folder unknown to train/ is an error.

Files without an image extension are left out, counted and reported the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from protoquant.data.images import FileImageDataset, is_image_file

SPLITS = ("train", "test")
COMMENT = "#"  # split-file lines starting with this are ignored
EXAMPLES = 3  # file names quoted in a note about left-out files


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
    return [f"{len(paths)} {what} left out (e.g. {', '.join(paths[:EXAMPLES])})"] if paths else []


def read_split_file(path: Path, root: Path, classes: list[str]) -> dict[str, str]:
    """{relative path: split} of a split file, each path checked to exist inside a class folder."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    listed: dict[str, tuple[str, int]] = {}
    with path.open(encoding="utf-8") as handle:
        for line, raw in enumerate(handle, 1):
            text = raw.strip()
            if not text or text.startswith(COMMENT):
                continue
            fields = text.rsplit(None, 1)
            if len(fields) != 2 or fields[1] not in SPLITS:
                raise ValueError(f"{path}:{line}: expected '<relative path> <train|test>', found {text!r}")
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
    """A labelled folder of images, "train" or "test" split (see the module docstring).

    Args:
        root: the dataset folder.
        split: "train" or "test".
        split_file: optional split file (relative to `root` or absolute).
    """

    name = "image-folder"

    def __init__(self, root: str | Path, split: str = "train", *, split_file: str | Path = "") -> None:
        if split not in SPLITS:
            raise ValueError(f"image-folder split must be one of {list(SPLITS)}, got {split!r}")
        if not str(root) or not Path(root).is_dir():
            raise FileNotFoundError(f"image-folder: data.root {str(root)!r} is not a folder")
        self.root, self.split = Path(root), split
        if split_file:
            files, labels, notes = self._from_split_file(self.root / split_file)
        elif all((self.root / s).is_dir() for s in SPLITS):
            files, labels, notes = self._from_split_folders()
            self.root = self.root / split
        else:
            raise ValueError(
                f"image-folder {self.root}: no split given. Pass data.split_file (lines "
                f"'<relative path> <train|test>') or arrange the images as {self.root}/train/<class>/ "
                f"and {self.root}/test/<class>/"
            )
        self.files, self.labels = tuple(files), np.asarray(labels, dtype=np.int64)
        empty = [c for i, c in enumerate(self.classes) if not (self.labels == i).any()]
        if empty and split == "train":
            notes.append(f"{len(empty)} class(es) without train images: {', '.join(empty[:EXAMPLES])}")
        self._report_skipped(notes)

    def _set_classes(self, folder: Path) -> dict[str, int]:
        classes = class_folders(folder)
        if not classes:
            raise ValueError(f"image-folder: {folder} holds no class folders")
        self.classes = tuple(classes)
        return {c: i for i, c in enumerate(classes)}

    def _from_split_file(self, path: Path) -> tuple[list[str], list[int], list[str]]:
        index = self._set_classes(self.root)
        listed = read_split_file(path, self.root, list(index))
        files = sorted(rel for rel, s in listed.items() if s == self.split)
        unlisted, others = [], []
        for name in index:
            images, rest = walk_images(self.root / name)
            unlisted += [f"{name}/{r}" for r in images if f"{name}/{r}" not in listed]
            others += [f"{name}/{r}" for r in rest]
        notes = _note(unlisted, f"images not listed in {path.name} were") + _note(others, "non-image files")
        return files, [index[f.split("/")[0]] for f in files], notes

    def _from_split_folders(self) -> tuple[list[str], list[int], list[str]]:
        index = self._set_classes(self.root / "train")
        folder = self.root / self.split
        files, labels, others = [], [], []
        for name in class_folders(folder):
            if name not in index:
                raise ValueError(
                    f"image-folder: class folder {folder / name} does not exist in {self.root / 'train'}"
                )
            images, rest = walk_images(folder / name)
            files += [f"{name}/{r}" for r in images]
            labels += [index[name]] * len(images)
            others += [f"{name}/{r}" for r in rest]
        return files, labels, _note(others, f"non-image files in {self.split}/")
