"""Shared helpers of the on-disk loaders: images as RGB, annotation text files, file lists.

`open_rgb` is the one way an image file is read. It decodes the whole file (so a truncated
file fails here, naming the file, not later inside a transform) and converts every mode to
8-bit RGB: grayscale is replicated, CMYK goes through Pillow's standard conversion, alpha is
dropped (not composited, as the FunnyBirds reference does), palettes are expanded and 16-bit
grayscale is scaled to 8 bits (v / 257, rounded), not clipped. The EXIF orientation tag is
applied (a phone photo stored sideways comes out upright, as photo viewers show it), except
where a loader's annotations are coordinates in the stored pixels: CUB and Stanford Cars read
with `orient=False`, so their boxes and part locations keep matching the pixels (torchvision's
loaders do not apply the tag either).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageOps

from protoquant.data.base import ImageDataset, ImageFile, stable_hash
from protoquant.errors import DataError

LOGGER = logging.getLogger(__name__)
# torchvision's image extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I" (int32) is read as 0..65535 data
SIXTEEN_TO_EIGHT_BIT = 257.0  # 65535 / 255: maps 0..65535 onto 0..255 exactly
ALPHA_MODES = ("LA", "La", "PA", "P")  # expanded through RGBA, whose alpha is then dropped
DECODE_ERRORS = (  # what Pillow's (and scipy.io's) decoders raise on a corrupt or truncated file
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
    Image.DecompressionBombError,
)


class MissingImageError(DataError, FileNotFoundError):
    """An image file that does not exist (caught as either a DataError or a FileNotFoundError)."""


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the image extensions (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """8-bit RGB copy of a loaded image of any common mode (see the module docstring)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # (H, W) 16-bit values
        scaled = np.round(np.clip(values, 0, 65535) / SIXTEEN_TO_EIGHT_BIT).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "F":
        raise DataError(f"{path}: floating-point images (mode F) have no defined 8-bit range")
    if mode in ALPHA_MODES:
        image = image.convert("RGBA")
    return image.convert("RGB")  # RGBA -> RGB drops alpha; also L, 1, CMYK, YCbCr, RGBX


def open_rgb(path: str | Path, *, orient: bool = True) -> Image.Image:
    """Decode an image file completely and return it as 8-bit RGB, upright by its EXIF orientation.

    Args:
        path: the image file.
        orient: apply the EXIF orientation tag (off only where annotations refer to stored pixels).

    Raises:
        MissingImageError: the file does not exist (a DataError and a FileNotFoundError).
        DataError: the file is unreadable, empty, truncated, corrupt, not an image or of an
            unsupported mode; the message names the file and why.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"cannot read image {path}: it is a folder, not a file")
    if not path.is_file():
        raise MissingImageError(f"image file {path} not found")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"cannot read image {path}: the file is empty (0 bytes)")
        with Image.open(path) as image:
            image.load()  # decodes every byte: truncated files fail here
            upright = ImageOps.exif_transpose(image) if orient else image  # a copy unless already upright
            return to_rgb(upright, path)
    except DataError:
        raise
    except DECODE_ERRORS as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def read_rows(path: Path, columns: int, *, rest: bool = False) -> list[tuple[int, list[str]]]:
    """Non-blank lines of a whitespace-separated text file as (1-based line number, fields).

    Args:
        path: the file.
        columns: fields every line must have.
        rest: the last field takes the rest of the line (names and paths with spaces).

    Raises:
        FileNotFoundError: the file is missing. ValueError: a line has the wrong field count.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                text = line.strip()
                if not text:
                    continue
                fields = text.split(None, columns - 1) if rest else text.split()
                if len(fields) != columns:
                    raise ValueError(
                        f"{path}:{number}: expected {columns} fields, found {len(fields)}: {text!r}"
                    )
                rows.append((number, fields))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    return rows


def parse_number(text: str, kind: type, where: str, what: str) -> int | float:
    """`int(text)` or `float(text)`, or a ValueError naming `where` (file:line) and `what`."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{where}: {what} must be {kind.__name__}, found {text!r}") from None
    if kind is float and not np.isfinite(value):
        raise ValueError(f"{where}: {what} must be finite, found {text!r}")
    return value


def load_mat(path: Path, *, squeeze: bool = True) -> dict:
    """A MATLAB (v5) file as scipy loads it (with `squeeze_me=squeeze`).

    Raises:
        FileNotFoundError: the file is missing. DataError: it is not a readable MATLAB file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        return scipy.io.loadmat(str(path), squeeze_me=squeeze)
    except (scipy.io.matlab.MatReadError, NotImplementedError, *DECODE_ERRORS) as err:
        raise DataError(f"cannot read MATLAB file {path}: {type(err).__name__}: {err}") from err


def mat_variable(mat: dict, name: str, path: Path) -> np.ndarray:
    """Variable `name` of a loaded MATLAB file as a 1-D array, or a ValueError naming the file."""
    if name not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no variable '{name}' (found {found})")
    return np.atleast_1d(mat[name])


def crop_to_box(image: Image.Image, box: Sequence[int], where: str, path: Path) -> Image.Image:
    """Crop to integer box (x1, y1, x2, y2), which must lie inside the image, else ValueError."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
        raise ValueError(
            f"{where}: box (x1, y1, x2, y2) = ({x1}, {y1}, {x2}, {y2}) lies outside the "
            f"{image.width}x{image.height} image {path}"
        )
    return image.crop((x1, y1, x2, y2))


class FileImageDataset(ImageDataset):
    """Images stored as files under `root`, listed by relative path, with integer labels.

    Subclasses fill `root`, `split`, `classes`, `files` (relative paths), `labels` and,
    where they leave files out on purpose, `skipped` (human-readable notes, each counted,
    logged and reported by `protoquant data check`).
    """

    root: Path
    files: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    _fingerprint: str | None = None

    def image_path(self, index: int) -> Path:
        """Absolute path of image `index`."""
        return self.root / self.files[index]

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self.image_path(index))

    def image_file(self, index: int) -> ImageFile | None:
        """`image_path(index)`, EXIF-oriented; None for a loader that overrides `load_image`
        without overriding this (its images need not be the plain file)."""
        if type(self).load_image is not FileImageDataset.load_image:
            return None
        return ImageFile(self.image_path(index), orient=True)

    @property
    def has_boxes(self) -> bool:
        return False

    def _report_skipped(self, notes: Sequence[str]) -> None:
        self.skipped = tuple(notes)
        for note in notes:
            LOGGER.warning("%s %s: %s", self.name, self.split, note)

    def fingerprint_extra(self) -> dict:
        """Loader-specific settings that change the returned images (e.g. the crop mode)."""
        return {}

    def fingerprint(self) -> str:
        """Hash of relative paths, file sizes, labels, classes, split and loader settings."""
        if self._fingerprint is None:
            sizes = [_size(self.root / f) for f in self.files]
            self._fingerprint = stable_hash(
                {
                    "name": self.name,
                    "split": self.split,
                    "classes": list(self.classes),
                    "files": list(self.files),
                    "sizes": sizes,
                    "labels": self.labels.tolist(),
                    **self.fingerprint_extra(),
                }
            )
        return self._fingerprint


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1  # missing: load_image and `data check` name it
