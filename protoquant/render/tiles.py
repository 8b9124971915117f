"""Small Pillow images for the report: heatmap overlays with boxes, window crops, source images.

Pure array -> image functions; they read explanation data and never run a model. Every heatmap
is drawn on a colour scale given by the caller, so all heatmaps of a figure share one scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from protoquant.explain.types import PrototypeEvidence, SourcePicture, TrainingPatch, window_crop

Scale = tuple[float, float]  # (low, high) of a heatmap colour scale

COLORMAP = "turbo"  # heatmap colours, low -> high
HEATMAP_ALPHA = (0.15, 0.65)  # overlay opacity where the map is lowest / highest
BOX_COLOUR = (255, 214, 0)  # high-activation boxes and training-patch cells
BOX_OUTLINE = (20, 20, 20)  # thin dark edge that keeps the box visible on bright pixels
TILE_SIZE = 224  # px, longest side of an image tile in the report
BOX_WIDTH = 3  # px at TILE_SIZE
PATCH_BOX_WIDTH = 4  # px at TILE_SIZE on training patches (often shown small)
PNG_COMPRESSION = 3  # zlib level: about the size of the default at less than half the time
TILE_QUALITY = 90  # JPEG quality of the report's tiles: a quarter of PNG's size on photos and noise


def map_scale(maps) -> Scale:
    """The colour scale spanning every value of `maps` (arrays), for a figure without a gallery."""
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    return (low, high) if high > low else (low, low + 1.0)


def upsample_map(heatmap: np.ndarray, side: int) -> np.ndarray:
    """(H, W) float map -> (side, side) float32, bicubic."""
    image = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)


def heatmap_overlay(image: np.ndarray, heatmap: np.ndarray, scale: Scale) -> np.ndarray:
    """(S, S, 3) uint8 image blended with a colour-mapped (S, S) map, stronger where the map is high.

    A value gets the same colour in every map drawn with the same `scale` (clipped at its ends).
    """
    low, high = scale
    unit = np.clip((heatmap - low) / (high - low), 0.0, 1.0)  # (S, S) in [0, 1]
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
    right, bottom = (
        max(left, (x2 + 1) * scale - 1),
        max(top, (y2 + 1) * scale - 1),
    )  # >= 1 px when scaled down
    width = max(1, round(line * max(image.size) / TILE_SIZE))
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, right, bottom), outline=BOX_OUTLINE, width=width + 2)
    inset = min(1.0, (right - left) / 2, (bottom - top) / 2)  # small cells (fine grids) keep a valid box
    draw.rectangle(
        (left + inset, top + inset, right - inset, bottom - inset), outline=BOX_COLOUR, width=width
    )
    return image


def image_tile(image: np.ndarray, size: int = TILE_SIZE) -> Image.Image:
    return _resized(image, size)[0]


def evidence_tile(
    image: np.ndarray, evidence: PrototypeEvidence, scale: Scale, size: int = TILE_SIZE
) -> Image.Image:
    """The image with prototype k's cosine similarity map overlaid and its peak cell outlined."""
    tile, factor = _resized(heatmap_overlay(image, evidence.similarity, scale), size)
    return draw_box(tile, evidence.box, factor)


def this_tile(
    image: np.ndarray, evidence: PrototypeEvidence, grid: tuple[int, int], size: int = TILE_SIZE
) -> Image.Image:
    """The test side's window around the peak cell: the same rule and zoom as a training patch."""
    crop, cell = window_crop(image, evidence.location, grid)
    tile, factor = _resized(crop, size)
    return draw_box(tile, cell, factor, PATCH_BOX_WIDTH)


def patch_tile(patch: TrainingPatch, size: int = TILE_SIZE) -> Image.Image:
    """A training patch crop with its cell outlined."""
    tile, factor = _resized(patch.crop, size)
    return draw_box(tile, patch.cell_box, factor, PATCH_BOX_WIDTH)


def strip_tile(tiles: list[Image.Image]) -> Image.Image:
    """Tiles side by side, top-aligned (a prototype's source image and its patches)."""
    strip = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
    left = 0
    for tile in tiles:
        strip.paste(tile, (left, 0))
        left += tile.width
    return strip


def source_tile(source: SourcePicture, scale: Scale, size: int = TILE_SIZE) -> Image.Image:
    """A prototype's source image with its cosine map overlaid and the patch cell outlined."""
    heatmap = upsample_map(source.similarity, source.image.shape[0])  # (s, s)
    tile, factor = _resized(heatmap_overlay(source.image, heatmap, scale), size)
    return draw_box(tile, source.box, factor)


def colour_stops(count: int = 11) -> str:
    """CSS linear-gradient stops of COLORMAP from low to high (the report's colour bar)."""
    colours = colormaps[COLORMAP](np.linspace(0.0, 1.0, count))[:, :3] * 255.0  # (count, 3)
    return ", ".join(f"rgb({r:.0f}, {g:.0f}, {b:.0f})" for r, g, b in colours)


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=PNG_COMPRESSION)
    return path


def save_tile(image: Image.Image, path: str | Path) -> Path:
    """A report tile as JPEG (TILE_QUALITY)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path, format="JPEG", quality=TILE_QUALITY)
    return path
