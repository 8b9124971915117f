"""Small Pillow images for the report: heatmap overlays with boxes, training-patch crops.

Pure array -> image functions; they read explanation data and never run a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from protoquant.explain.types import PrototypeEvidence, TrainingPatch

COLORMAP = "turbo"  # heatmap colours, low -> high
HEATMAP_ALPHA = (0.15, 0.65)  # overlay opacity where the map is lowest / highest
BOX_COLOUR = (255, 214, 0)  # high-activation boxes and training-patch cells
BOX_OUTLINE = (20, 20, 20)  # thin dark edge that keeps the box visible on bright pixels
TILE_SIZE = 224  # px, longest side of an image tile in the report
BOX_WIDTH = 3  # px at TILE_SIZE
PATCH_BOX_WIDTH = 4  # px at TILE_SIZE on training patches (often shown small)
PNG_COMPRESSION = 3  # zlib level: about the size of the default at less than half the time


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 image blended with a colour-mapped (S, S) map, stronger where the map is high."""
    low, high = float(heatmap.min()), float(heatmap.max())
    unit = (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)  # (S, S) in [0, 1]
    colours = colormaps[COLORMAP](unit)[..., :3] * 255.0  # (S, S, 3)
    alpha = (HEATMAP_ALPHA[0] + (HEATMAP_ALPHA[1] - HEATMAP_ALPHA[0]) * unit)[..., None]  # (S, S, 1)
    return (image * (1.0 - alpha) + colours * alpha).round().clip(0, 255).astype(np.uint8)


def _resized(pixels: np.ndarray, size: int) -> tuple[Image.Image, float]:
    """Scale so the longest side is `size`; returns the image and the scale factor."""
    height, width = pixels.shape[:2]
    scale = size / max(height, width)
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(pixels).resize(shape, Image.Resampling.BICUBIC), scale


def draw_box(
    image: Image.Image, box: tuple[int, int, int, int], scale: float, line: int = BOX_WIDTH
) -> Image.Image:
    """Draw inclusive pixel box (x1, y1, x2, y2), given in unscaled pixels, onto `image` in place."""
    x1, y1, x2, y2 = box
    left, top = x1 * scale, y1 * scale
    right, bottom = (x2 + 1) * scale - 1, (y2 + 1) * scale - 1
    width = max(1, round(line * max(image.size) / TILE_SIZE))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, right, bottom), outline=BOX_OUTLINE, width=width + 2)
    inset = 1
    draw.rectangle(
        (left + inset, top + inset, right - inset, bottom - inset), outline=BOX_COLOUR, width=width
    )
    return image


def image_tile(image: np.ndarray, size: int = TILE_SIZE) -> Image.Image:
    return _resized(image, size)[0]


def evidence_tile(image: np.ndarray, evidence: PrototypeEvidence, size: int = TILE_SIZE) -> Image.Image:
    """The image with prototype k's activation overlaid and its high-activation box."""
    tile, scale = _resized(heatmap_overlay(image, evidence.activation), size)
    return draw_box(tile, evidence.box, scale)


def patch_tile(patch: TrainingPatch, size: int = TILE_SIZE) -> Image.Image:
    """A training patch crop, scaled up, with its cell outlined."""
    tile, scale = _resized(patch.crop, size)
    return draw_box(tile, patch.cell_box, scale, PATCH_BOX_WIDTH)


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=PNG_COMPRESSION)
    return path
