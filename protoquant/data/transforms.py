"""Image -> normalised tensor, for the plain view and for seeded augmented views.

Augmented views are a pure function of (seed, image index, view index), so a cache
built twice holds identical features, and the transform is described by a dict the
cache manifest records. Every resize uses one interpolation, the backbone's (bilinear, the
only one before it was configurable, is left out of the description so older caches keep
their keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from protoquant.config import RunConfig

ASPECT_RANGE = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision default)
CROP_TRIES = 10  # attempts before falling back to the centre crop
INTERPOLATIONS = {
    "nearest": TF.InterpolationMode.NEAREST,
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
}
# What a config saved before backbone.interpolation existed ('' there) resized with.
LEGACY_INTERPOLATION = "bilinear"


@dataclass(frozen=True)
class ViewGeometry:
    """Where a view comes from in its source image: `pixels` as coordinates, for other decoders.

    The view is: crop the box (top, left, height, width) in source pixels, resize the crop to
    `resize` (h, w), centre-crop `size` x `size` (a no-op when `resize` is already that), then
    flip left-right if `flip`. Applied with PIL it gives exactly `ViewTransform.pixels`.
    """

    top: int
    left: int
    height: int
    width: int
    resize: tuple[int, int]
    size: int
    flip: bool


@dataclass(frozen=True)
class ViewTransform:
    """Resize (+ centre crop if crop_ratio < 1) (view 0) or seeded random-resized-crop + flip (views >= 1)."""

    image_size: int
    crop_ratio: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_crop_scale: float = 0.5
    seed: int = 0
    interpolation: str = LEGACY_INTERPOLATION

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if not 0.0 < self.crop_ratio <= 1.0 or self.image_size < 1:
            raise ValueError(
                f"transform needs a concrete image_size >= 1 and crop_ratio in (0, 1], got {self.image_size}, "
                f"{self.crop_ratio}: resolve the backbone config first (protoquant.backbones.resolve_input)"
            )

    @property
    def mode(self) -> TF.InterpolationMode:
        return INTERPOLATIONS[self.interpolation]

    def describe(self) -> dict[str, Any]:
        described = {"kind": "views-v1", **asdict(self)}
        if self.interpolation == LEGACY_INTERPOLATION:
            del described["interpolation"]  # the key every cache built before the field existed has
        return described

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """View 0 of a float (B, 3, h, w) batch in [0, 1]: the same framing as for PIL images."""
        side = [self.image_size, self.image_size]
        if self.crop_ratio >= 1.0:
            framed = TF.resize(images, side, interpolation=self.mode, antialias=True)
        else:
            short = int(math.floor(self.image_size / self.crop_ratio))
            framed = TF.center_crop(TF.resize(images, short, interpolation=self.mode, antialias=True), side)
        return TF.normalize(framed, list(self.mean), list(self.std))  # (B, 3, S, S)

    def __call__(self, image: Image.Image, index: int, view: int) -> torch.Tensor:
        """(3, S, S) float tensor of view `view` of image `index`."""
        return self.normalise(self.pixels(image, index, view))

    def pixels(self, image: Image.Image, index: int, view: int) -> torch.Tensor:
        """(3, S, S) uint8 tensor of view `view` of image `index`, before normalisation.

        Data loaders return these (a quarter of the bytes of float pixels to collate, pin and
        copy to the accelerator); `normalise` finishes the transform where the backbone runs.
        """
        side = [self.image_size, self.image_size]
        if view == 0 and self.crop_ratio >= 1.0:  # the part-prototype protocols: plain resize to S x S
            crop = TF.resize(image, side, interpolation=self.mode)
        elif view == 0:  # ImageNet convention: shorter side to S / ratio, centre crop S
            resized = TF.resize(
                image, int(math.floor(self.image_size / self.crop_ratio)), interpolation=self.mode
            )
            crop = TF.center_crop(resized, side)
        else:
            rng = np.random.default_rng((self.seed, index, view))
            top, left, height, width = _crop_box(image.width, image.height, self.min_crop_scale, rng)
            crop = TF.resized_crop(image, top, left, height, width, side, interpolation=self.mode)
            if rng.random() < 0.5:
                crop = TF.hflip(crop)
        return TF.pil_to_tensor(crop)  # (3, S, S) uint8

    def geometry(self, width: int, height: int, index: int, view: int) -> ViewGeometry:
        """The crop, resize and flip that `pixels` applies to a `width` x `height` image."""
        side = self.image_size
        if view == 0 and self.crop_ratio >= 1.0:
            return ViewGeometry(0, 0, height, width, (side, side), side, False)
        if view == 0:
            return ViewGeometry(
                0, 0, height, width, _shorter_side_to(width, height, side, self.crop_ratio), side, False
            )
        rng = np.random.default_rng((self.seed, index, view))  # the draws of `pixels`, in its order
        top, left, crop_height, crop_width = _crop_box(width, height, self.min_crop_scale, rng)
        flip = bool(rng.random() < 0.5)
        return ViewGeometry(top, left, crop_height, crop_width, (side, side), side, flip)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., 3, S, S) -> float32 normalised, on the pixels' device.

        Exactly torchvision's to_tensor (divide by 255) followed by its normalize, wherever it runs.
        """
        return TF.normalize(pixels.float().div_(255), list(self.mean), list(self.std), inplace=True)


def _crop_box(
    width: int, height: int, min_scale: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    area = width * height
    log_ratio = (math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def _shorter_side_to(width: int, height: int, side: int, crop_ratio: float) -> tuple[int, int]:
    """(h, w) that torchvision's resize to an int size gives: shorter side floor(side / ratio)."""
    short = int(math.floor(side / crop_ratio))
    long = int(short * max(width, height) / min(width, height))
    return (long, short) if width <= height else (short, long)


def view_transform(config: RunConfig, mean: Sequence[float], std: Sequence[float]) -> ViewTransform:
    """The transform a run caches with; its view 0 is also the evaluation transform.

    `config.backbone` must be resolved (`protoquant.backbones.resolve_input`): a run saves it so.
    Only an interpolation of '' is read, as `LEGACY_INTERPOLATION`: a checkpoint saved before the
    field existed has it, and resized bilinearly.
    """
    backbone = config.backbone
    return ViewTransform(
        backbone.image_size,
        backbone.crop_ratio,
        tuple(mean),
        tuple(std),
        config.cache.min_crop_scale,
        config.seed,
        backbone.interpolation or LEGACY_INTERPOLATION,
    )
