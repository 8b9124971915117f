"""Drawing primitives of the synthetic parts dataset (numpy + Pillow, no model code).

Every primitive paints into a (H, W, 3) uint8 canvas in place and returns the exact
(H, W) bool mask of the pixels it painted, so ground-truth masks match the pixels by
construction (nothing is anti-aliased). Lengths are given at `REFERENCE_SIZE` pixels and
scaled by the caller-supplied `scale` = image_size / REFERENCE_SIZE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

REFERENCE_SIZE = 224  # image side length that all pixel constants below refer to

# --- shapes: polygons in unit coordinates, inscribed in the unit circle ---
CIRCLE_VERTICES = 48  # vertices of the polygon that approximates a circle
STAR_POINTS = 5  # points of the star
STAR_INNER_RADIUS = 0.45  # inner / outer radius of the star
DIAMOND_HALF_WIDTH = 0.6  # half width of the diamond (its half height is 1)
CROSS_ARM_HALF_WIDTH = 0.35  # half width of each arm of the cross
CROSS_ARM_LENGTH = 0.93  # arm length of the cross (keeps its corners inside the unit circle)
RING_INNER_RADIUS = 0.55  # hole radius / outer radius of the ring

# --- textures (lengths in reference pixels) ---
TEXTURE_PERIOD = 12.0  # period of stripes, dot grid and checkerboard
STRIPE_DUTY = 0.5  # fraction of each stripe period painted in the pattern colour
DOT_RADIUS = 3.2  # radius of each dot
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # RGB -> luma (ITU-R BT.601)
LUMA_SPLIT = 130.0  # colours brighter than this get a dark pattern, darker ones a light one
PATTERN_DARK_FACTOR = 0.25  # dark pattern colour = colour * this
PATTERN_LIGHT_MIX = 0.7  # light pattern colour = colour mixed this far towards white

# --- background (intensities on the 0..255 scale) ---
BACKGROUND_GRID = 3  # the colour gradient interpolates a GRID x GRID grid of random colours
BACKGROUND_LOW = 70.0  # lowest channel value of a gradient colour
BACKGROUND_HIGH = 200.0  # highest channel value of a gradient colour
BACKGROUND_SATURATION = 0.4  # gradient colours keep this fraction of their chroma (muted)
BLOB_CELL = 8.0  # cell size of the mid-frequency clutter noise, in reference pixels
BLOB_AMPLITUDE = 14.0  # standard deviation of the mid-frequency clutter noise
FINE_NOISE_MASK = 15  # per-pixel colour noise is uniform in [0, FINE_NOISE_MASK] (2^k - 1)

# --- background objects ---
ELLIPSE_VERTICES = 40  # vertices of the polygon that approximates an ellipse
DISTRACTOR_KINDS = ("line", "ellipse", "outline")  # thin segment, filled ellipse, ellipse ring

TEXTURES = ("solid", "stripes", "dots", "checker")


@dataclass(frozen=True)
class Variant:
    """One look of one part slot: a shape filled with a colour and a texture."""

    shape: str
    colour_name: str
    colour: tuple[int, int, int]
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour_name} {self.texture} {self.shape}"


@dataclass(frozen=True)
class PartPlacement:
    """Where one part goes: the square box (x0, y0, size) it is inscribed in, and its angle."""

    x0: int
    y0: int
    size: int
    angle: float


@dataclass(frozen=True)
class Distractor:
    """A muted background object; radii, width in pixels of the rendered image."""

    kind: str
    centre: tuple[float, float]
    radii: tuple[float, float]
    angle: float
    width: float
    colour: tuple[int, int, int]


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    """(n, 2) vertices of a regular n-gon, first vertex at angle `phase` (y points down)."""
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer = _regular_polygon(STAR_POINTS, 1.0, -np.pi / 2)
    inner = _regular_polygon(STAR_POINTS, STAR_INNER_RADIUS, -np.pi / 2 + np.pi / STAR_POINTS)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)  # (2 * points, 2), alternating


def _cross() -> np.ndarray:
    a, b = CROSS_ARM_HALF_WIDTH, CROSS_ARM_LENGTH
    quarter = np.array([[a, -b], [a, -a], [b, -a]])  # upper-right corner of the plus sign
    return np.concatenate([quarter @ _rotation(k).T for k in np.pi / 2 * np.arange(4)])


def _diamond() -> np.ndarray:
    return np.array([[0, -1], [DIAMOND_HALF_WIDTH, 0], [0, 1], [-DIAMOND_HALF_WIDTH, 0]])


_SHAPE_BUILDERS = {
    "circle": lambda: [(_regular_polygon(CIRCLE_VERTICES), 1)],
    "square": lambda: [(_regular_polygon(4, 1.0, np.pi / 4), 1)],
    "triangle": lambda: [(_regular_polygon(3, 1.0, -np.pi / 2), 1)],
    "star": lambda: [(_star(), 1)],
    "hexagon": lambda: [(_regular_polygon(6), 1)],
    "diamond": lambda: [(_diamond(), 1)],
    "cross": lambda: [(_cross(), 1)],
    "ring": lambda: [
        (_regular_polygon(CIRCLE_VERTICES), 1),
        (_regular_polygon(CIRCLE_VERTICES, RING_INNER_RADIUS), 0),
    ],
}  # shape name -> builder of its layers; read-only
SHAPES = tuple(_SHAPE_BUILDERS)


def shape_layers(shape: str) -> list[tuple[np.ndarray, int]]:
    """Polygons (unit coordinates) with fill 1 (paint) or 0 (cut out), drawn in order."""
    if shape not in _SHAPE_BUILDERS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return _SHAPE_BUILDERS[shape]()


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def part_mask(shape: str, size: int, angle: float) -> np.ndarray:
    """(size, size) bool mask of `shape` inscribed in a size x size box, rotated by `angle`."""
    patch = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(patch)
    centre, radius = size / 2.0, size / 2.0 - 0.5
    for polygon, fill in shape_layers(shape):
        xy = centre + radius * polygon @ _rotation(angle).T
        draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)
    return np.asarray(patch, dtype=bool)


def texture_pattern(texture: str, size: int, angle: float, scale: float) -> np.ndarray:
    """(size, size) bool, True where the pattern colour goes; the pattern turns with the part."""
    coords = np.arange(size, dtype=np.float32) + 0.5 - size / 2.0
    x, y = coords[None, :], coords[:, None]
    u = x * np.cos(angle) + y * np.sin(angle)  # (size, size) coordinates along the part's axes
    v = -x * np.sin(angle) + y * np.cos(angle)
    period = TEXTURE_PERIOD * scale
    if texture == "solid":
        return np.zeros((size, size), dtype=bool)
    if texture == "stripes":
        return np.mod(u / period, 1.0) < STRIPE_DUTY
    if texture == "dots":
        du, dv = np.mod(u / period, 1.0) - 0.5, np.mod(v / period, 1.0) - 0.5
        return np.hypot(du, dv) * period < DOT_RADIUS * scale
    if texture == "checker":
        return (np.floor(2 * u / period) + np.floor(2 * v / period)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def pattern_colour(colour: tuple[int, int, int]) -> np.ndarray:
    """(3,) uint8 second colour of a texture: dark on bright colours, light on dark ones."""
    rgb = np.asarray(colour, dtype=np.float32)
    if float(rgb @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)) > LUMA_SPLIT:
        return (rgb * PATTERN_DARK_FACTOR).astype(np.uint8)
    return (rgb + (255.0 - rgb) * PATTERN_LIGHT_MIX).astype(np.uint8)


def draw_part(canvas: np.ndarray, variant: Variant, place: PartPlacement, scale: float) -> np.ndarray:
    """Paint one part into `canvas` (H, W, 3) uint8 in place; return its (H, W) bool mask."""
    s = place.size
    local = part_mask(variant.shape, s, place.angle)  # (s, s)
    pattern = texture_pattern(variant.texture, s, place.angle, scale)  # (s, s)
    window = canvas[place.y0 : place.y0 + s, place.x0 : place.x0 + s]  # view into canvas
    window[local & ~pattern] = np.asarray(variant.colour, dtype=np.uint8)
    window[local & pattern] = pattern_colour(variant.colour)
    mask = np.zeros(canvas.shape[:2], dtype=bool)
    mask[place.y0 : place.y0 + s, place.x0 : place.x0 + s] = local
    return mask


def _ellipse(centre: np.ndarray, radii: tuple[float, float], angle: float) -> np.ndarray:
    """(ELLIPSE_VERTICES, 2) vertices of a rotated ellipse."""
    return centre + (_regular_polygon(ELLIPSE_VERTICES) * np.asarray(radii)) @ _rotation(angle).T


def _object_polygons(obj: Distractor) -> list[tuple[np.ndarray, int]]:
    """Polygon layers (image coordinates, fill 1 or 0) of an ellipse or outline object."""
    centre = np.asarray(obj.centre)
    layers = [(_ellipse(centre, obj.radii, obj.angle), 1)]
    if obj.kind == "outline":
        inner = (max(obj.radii[0] - obj.width, 0.0), max(obj.radii[1] - obj.width, 0.0))
        layers.append((_ellipse(centre, inner, obj.angle), 0))
    return layers


def object_mask(obj: Distractor, height: int, width: int) -> np.ndarray:
    """(height, width) bool pixels of a background object, rasterised without anti-aliasing."""
    if obj.kind not in DISTRACTOR_KINDS:
        raise ValueError(f"unknown background object kind {obj.kind!r}; expected {DISTRACTOR_KINDS}")
    reach = max(obj.radii) + obj.width  # no pixel of the object lies farther from its centre
    x0, y0 = (max(0, int(c - reach)) for c in obj.centre)
    x1, y1 = min(width, int(obj.centre[0] + reach) + 2), min(height, int(obj.centre[1] + reach) + 2)
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    layer = Image.new("L", (x1 - x0, y1 - y0), 0)  # only the object's box, for speed
    draw, offset = ImageDraw.Draw(layer), np.array([x0, y0])
    if obj.kind == "line":
        half = obj.radii[0] * np.array([np.cos(obj.angle), np.sin(obj.angle)])
        ends = [tuple(np.asarray(obj.centre) - offset + sign * half) for sign in (-1.0, 1.0)]
        draw.line(ends, fill=1, width=max(1, round(obj.width)))
    for polygon, fill in _object_polygons(obj) if obj.kind != "line" else []:
        draw.polygon([tuple(p) for p in (polygon - offset).tolist()], fill=fill)
    mask[y0:y1, x0:x1] = np.asarray(layer, dtype=bool)
    return mask


def draw_distractor(canvas: np.ndarray, obj: Distractor) -> np.ndarray:
    """Paint one background object into `canvas` in place; return its (H, W) bool mask."""
    mask = object_mask(obj, *canvas.shape[:2])
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size:
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        canvas[window][mask[window]] = np.asarray(obj.colour, dtype=np.uint8)
    return mask


def render_background(seed: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 cluttered background: muted colour gradient plus noise.

    The gradient and the mid-frequency clutter are built on a coarse grid and upsampled
    once (bilinear, so values stay in range); fine noise is added at full resolution.
    """
    rng = np.random.default_rng(seed)
    grid = rng.uniform(BACKGROUND_LOW, BACKGROUND_HIGH, (BACKGROUND_GRID, BACKGROUND_GRID, 3))
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + BACKGROUND_SATURATION * (grid - grey)  # desaturate towards grey
    cells = round(REFERENCE_SIZE / BLOB_CELL)  # the same clutter scale at every image size
    coarse = Image.fromarray(grid.astype(np.uint8)).resize((cells, cells), Image.BILINEAR)
    blobs = BLOB_AMPLITUDE * rng.standard_normal((cells, cells, 3))  # (cells, cells, 3)
    coarse = np.clip(np.asarray(coarse, dtype=np.float64) + blobs, 0, 255 - FINE_NOISE_MASK)
    smooth = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    fine = np.frombuffer(rng.bytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3)
    return np.asarray(smooth) + (fine & FINE_NOISE_MASK)  # <= 255 by the clip above
