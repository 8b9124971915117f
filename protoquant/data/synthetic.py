"""SyntheticParts: a seeded, download-free image dataset with ground-truth parts.

Every class is one combination of part variants, one variant per slot (`PART_SLOTS`):
four slots with three variants each, a variant being a shape, a saturated colour and a
texture. An image shows the four parts of its class at random non-overlapping positions,
scales and angles, on top of a cluttered background (muted colour gradient, noise) and
2-4 grey background objects. Everything about image i is a pure function of
(seed, split, i), so `render` can redraw the same image with chosen parts or background
objects left out: the interventions of FunnyBirds-style metrics (Hesse et al., ICCV 2023).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from protoquant.data.base import ImageDataset, PartAnnotations, stable_hash
from protoquant.data.synthetic_draw import (
    DISTRACTOR_KINDS,
    REFERENCE_SIZE,
    Distractor,
    PartPlacement,
    Variant,
    draw_distractor,
    draw_part,
    render_background,
)

GENERATOR_VERSION = 1  # bump whenever a change below alters any pixel, label or class
SPLIT_CODES = {"train": 0, "test": 1}  # mixed into the seed so splits differ
CLASS_STREAM = 1  # seed-sequence tag of the class table (shared by all splits)
IMAGE_STREAM = 2  # seed-sequence tag of the per-image layouts
MIN_IMAGE_SIZE = 64  # smaller images cannot hold four parts with visible textures

# Layout, in pixels at REFERENCE_SIZE (scaled to the image size)
PART_SIZE_RANGE = (52, 72)  # side of the square box a part is inscribed in (inclusive)
PART_GAP = 4  # minimum gap between the boxes of two parts
PLACEMENT_TRIES = 100  # random positions tried per part before restarting the layout
PLACEMENT_RESTARTS = 20  # layouts tried before falling back to a jittered grid
BACKGROUND_OBJECTS = (2, 4)  # number of background objects per image (inclusive)
LINE_HALF_LENGTH = (25.0, 80.0)  # half length of a line object
ELLIPSE_RADIUS = (10.0, 40.0)  # each radius of an ellipse or outline object
LINE_WIDTH = (2.0, 5.0)  # stroke width of a line object
OUTLINE_WIDTH = (3.0, 7.0)  # stroke width of an ellipse outline object
OBJECT_GREY = (60, 200)  # grey level of a background object (inclusive)
OBJECT_TINT = 10  # per-channel offset (+-) that tints a background object's grey
BACKGROUND_SEEDS = 2**63 - 1  # background seeds are drawn from [0, BACKGROUND_SEEDS)


@dataclass(frozen=True)
class PartSlot:
    """A part slot: its name and the variants a class chooses from."""

    name: str
    variants: tuple[Variant, ...]


PART_SLOTS: tuple[PartSlot, ...] = (
    PartSlot("crest", (
        Variant("circle", "red", (230, 25, 40), "solid"),
        Variant("triangle", "blue", (30, 80, 235), "stripes"),
        Variant("star", "yellow", (255, 220, 0), "dots"),
    )),
    PartSlot("body", (
        Variant("square", "green", (0, 170, 60), "checker"),
        Variant("hexagon", "magenta", (220, 0, 200), "solid"),
        Variant("ring", "orange", (255, 130, 0), "stripes"),
    )),
    PartSlot("tail", (
        Variant("diamond", "cyan", (0, 215, 235), "dots"),
        Variant("cross", "purple", (120, 40, 190), "checker"),
        Variant("triangle", "lime", (160, 240, 20), "solid"),
    )),
    PartSlot("wing", (
        Variant("ring", "pink", (255, 120, 180), "dots"),
        Variant("star", "white", (250, 250, 250), "checker"),
        Variant("hexagon", "brown", (140, 70, 10), "stripes"),
    )),
)  # fmt: skip
PART_NAMES = tuple(slot.name for slot in PART_SLOTS)


@dataclass(frozen=True)
class Layout:
    """Everything random about one image: background seed, part placements, background objects."""

    background_seed: int
    parts: tuple[PartPlacement, ...]
    objects: tuple[Distractor, ...]


def _neighbours(combo: tuple[int, ...], sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """All combinations that differ from `combo` in exactly one slot."""
    return [combo[:p] + (v,) + combo[p + 1 :] for p, n in enumerate(sizes) for v in range(n) if v != combo[p]]


def make_classes(num_classes: int, seed: int) -> np.ndarray:
    """(C, P) int64 variant index per slot for C distinct classes, deterministic in `seed`.

    Classes are grown one at a time, each new one a single-slot change of an existing one,
    so for C >= 2 every class has a sibling that differs from it in exactly one part.
    """
    sizes = [len(slot.variants) for slot in PART_SLOTS]
    capacity = math.prod(sizes)
    if not 1 <= num_classes <= capacity:
        raise ValueError(f"num_classes must lie in [1, {capacity}], got {num_classes}")
    rng = np.random.default_rng([seed, CLASS_STREAM])
    chosen = [tuple(int(rng.integers(n)) for n in sizes)]
    while len(chosen) < num_classes:
        candidates = sorted({nb for c in chosen for nb in _neighbours(c, sizes)} - set(chosen))
        chosen.append(candidates[int(rng.integers(len(candidates)))])
    return np.asarray(chosen, dtype=np.int64)


def minimal_sufficient_sets(class_parts: np.ndarray, class_index: int) -> list[tuple[int, ...]]:
    """Minimal slot sets S on which no other class shares all of class `class_index`'s variants.

    Sufficiency is monotone (a superset of a sufficient set is sufficient), so visiting sets
    by size and skipping supersets of sets already found yields exactly the minimal ones.
    """
    target = class_parts[class_index]
    others = np.delete(class_parts, class_index, axis=0)  # (C - 1, P)
    found: list[tuple[int, ...]] = []
    for k in range(class_parts.shape[1] + 1):
        for subset in itertools.combinations(range(class_parts.shape[1]), k):
            if any(set(f) <= set(subset) for f in found):
                continue
            cols = list(subset)
            if not (others[:, cols] == target[cols]).all(axis=1).any():
                found.append(subset)
    return found


def _disjoint(box: tuple[int, int, int], others: Sequence[tuple[int, int, int]], gap: int) -> bool:
    """Whether square box (x, y, size) keeps at least `gap` pixels from every other box."""
    x, y, s = box
    return all(
        x + s + gap <= bx or bx + bs + gap <= x or y + s + gap <= by or by + bs + gap <= y
        for bx, by, bs in others
    )


def _place_boxes(
    rng: np.random.Generator, sizes: Sequence[int], image_size: int, gap: int
) -> list[tuple[int, int, int]]:
    """Non-overlapping (x0, y0, size) boxes by rejection sampling, or a jittered grid."""
    for _ in range(PLACEMENT_RESTARTS):
        boxes: list[tuple[int, int, int]] = []
        for s in sizes:
            tries = (
                (*(int(v) for v in rng.integers(0, image_size - s + 1, size=2)), int(s))
                for _ in range(PLACEMENT_TRIES)
            )
            box = next((b for b in tries if _disjoint(b, boxes, gap)), None)
            if box is None:
                break  # this layout is stuck: restart it
            boxes.append(box)
        if len(boxes) == len(sizes):
            return boxes
    return _grid_boxes(rng, sizes, image_size, gap)


def _grid_boxes(
    rng: np.random.Generator, sizes: Sequence[int], image_size: int, gap: int
) -> list[tuple[int, int, int]]:
    """Fallback: parts in shuffled cells of a square grid, shrunk to fit, jittered in the cell."""
    per_row = math.ceil(math.sqrt(len(sizes)))
    cell = image_size // per_row
    cells = rng.permutation(per_row * per_row)[: len(sizes)]  # no slot owns a fixed cell
    boxes = []
    for s, c in zip(sizes, cells.tolist()):
        s = int(min(s, cell - gap))
        row, col = divmod(c, per_row)
        jx, jy = (int(v) for v in rng.integers(0, cell - s - gap + 1, size=2))
        boxes.append((col * cell + jx, row * cell + jy, s))
    return boxes


def _sample_object(rng: np.random.Generator, image_size: int, scale: float) -> Distractor:
    """One muted grey background object anywhere in (or partly outside) the image."""
    kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
    centre = (float(rng.uniform(0, image_size)), float(rng.uniform(0, image_size)))
    if kind == "line":
        radii = (float(rng.uniform(*LINE_HALF_LENGTH)) * scale, 0.0)
        width = float(rng.uniform(*LINE_WIDTH)) * scale
    else:
        radii = tuple(float(r) * scale for r in rng.uniform(*ELLIPSE_RADIUS, size=2))
        width = float(rng.uniform(*OUTLINE_WIDTH)) * scale
    grey = int(rng.integers(OBJECT_GREY[0], OBJECT_GREY[1] + 1))
    tint = rng.integers(-OBJECT_TINT, OBJECT_TINT + 1, size=3)
    colour = tuple(int(c) for c in np.clip(grey + tint, 0, 255))
    return Distractor(kind, centre, radii, float(rng.uniform(0, np.pi)), width, colour)


def sample_layout(seed: int, split: str, index: int, image_size: int) -> Layout:
    """The layout of image `index`: a pure function of (seed, split, index, image_size)."""
    rng = np.random.default_rng([seed, IMAGE_STREAM, SPLIT_CODES[split], index])
    scale = image_size / REFERENCE_SIZE
    low, high = (round(s * scale) for s in PART_SIZE_RANGE)
    sizes = rng.integers(low, high + 1, size=len(PART_SLOTS))
    angles = rng.uniform(0, 2 * np.pi, size=len(PART_SLOTS))
    boxes = _place_boxes(rng, sizes.tolist(), image_size, max(1, round(PART_GAP * scale)))
    parts = tuple(PartPlacement(x, y, s, float(a)) for (x, y, s), a in zip(boxes, angles))
    count = int(rng.integers(BACKGROUND_OBJECTS[0], BACKGROUND_OBJECTS[1] + 1))
    objects = tuple(_sample_object(rng, image_size, scale) for _ in range(count))
    return Layout(int(rng.integers(BACKGROUND_SEEDS)), parts, objects)


def _class_name(row: np.ndarray) -> str:
    """Unique short class name: the colours of its variants, slot by slot."""
    return "-".join(slot.variants[v].colour_name for slot, v in zip(PART_SLOTS, row.tolist()))


def _check_removals(items: Sequence[int], count: int, what: str) -> frozenset[int]:
    bad = [i for i in items if not 0 <= int(i) < count]
    if bad:
        raise IndexError(f"{what} indices {bad} out of range [0, {count})")
    return frozenset(int(i) for i in items)


class SyntheticParts(ImageDataset):
    """Procedural part-based classification dataset with exact part and background masks.

    Labels are interleaved (image i has label i % num_classes), so every prefix of the
    dataset is close to class-balanced. Classes (and `class_parts`) depend on `seed` only;
    the images depend on (seed, split).

    Args:
        split: "train" or "test"; the split is mixed into the per-image seeds.
        num_classes: number of classes C (at most the number of variant combinations).
        images_per_class: images per class; N = num_classes * images_per_class.
        image_size: side length of the square RGB images.
        seed: non-negative generator seed.
    """

    name = "synthetic"

    def __init__(
        self,
        split: str = "train",
        *,
        num_classes: int = 10,
        images_per_class: int = 60,
        image_size: int = 224,
        seed: int = 0,
    ) -> None:
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
        if images_per_class < 1 or image_size < MIN_IMAGE_SIZE or seed < 0:
            raise ValueError(
                f"need images_per_class >= 1, image_size >= {MIN_IMAGE_SIZE} and seed >= 0; got "
                f"{images_per_class}, {image_size}, {seed}"
            )
        self.split = split
        self.images_per_class = images_per_class
        self.image_size = image_size
        self.seed = seed
        self.class_parts = make_classes(num_classes, seed)  # (C, P)
        self.classes = tuple(_class_name(row) for row in self.class_parts)
        self.labels = np.arange(num_classes * images_per_class, dtype=np.int64) % num_classes
        self.part_names = PART_NAMES

    @property
    def has_parts(self) -> bool:
        return True

    def variants(self, class_index: int) -> tuple[Variant, ...]:
        """The P part variants of class `class_index`, in slot order."""
        return tuple(s.variants[v] for s, v in zip(PART_SLOTS, self.class_parts[class_index].tolist()))

    def layout(self, index: int) -> Layout:
        """Positions, scales, angles and background objects of image `index`."""
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for {self.name} {self.split} (N={len(self)})")
        return sample_layout(self.seed, self.split, int(index), self.image_size)

    def _compose(
        self, index: int, remove_parts: Sequence[int], remove_background: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8, part masks (P, H, W) and visible object masks (M, H, W)."""
        layout = self.layout(index)
        skip_parts = _check_removals(remove_parts, len(layout.parts), "part")
        skip_objects = _check_removals(remove_background, len(layout.objects), "background object")
        size, scale = self.image_size, self.image_size / REFERENCE_SIZE
        canvas = render_background(layout.background_seed, size)
        drawn = np.zeros((len(layout.objects), size, size), dtype=bool)  # (M, H, W)
        for m, obj in enumerate(layout.objects):
            if m not in skip_objects:
                drawn[m] = draw_distractor(canvas, obj)
        part_masks = np.zeros((len(layout.parts), size, size), dtype=bool)  # (P, H, W)
        for p, (variant, place) in enumerate(zip(self.variants(self.labels[index]), layout.parts)):
            if p not in skip_parts:
                part_masks[p] = draw_part(canvas, variant, place, scale)
        covered = part_masks.any(axis=0)  # (H, W) pixels painted over the objects
        for m in reversed(range(len(layout.objects))):
            drawn[m] &= ~covered
            covered |= drawn[m]
        return canvas, part_masks, drawn

    def render(
        self, index: int, *, remove_parts: Sequence[int] = (), remove_background: Sequence[int] = ()
    ) -> Image.Image:
        """Image `index` redrawn without the given part slots and background objects."""
        canvas, _, _ = self._compose(index, remove_parts, remove_background)
        return Image.fromarray(canvas, mode="RGB")

    def load_image(self, index: int) -> Image.Image:
        return self.render(index)

    def annotations(self, index: int) -> PartAnnotations:
        """Exact part masks; keypoints = mask centroids (x, y); box = half-open pixel bounds."""
        _, masks, _ = self._compose(index, (), ())
        visible = masks.any(axis=(1, 2))  # (P,)
        keypoints = np.zeros((len(masks), 2), dtype=np.float32)  # (P, 2) as (x, y)
        for p in np.flatnonzero(visible):
            rows, cols = np.nonzero(masks[p])
            keypoints[p] = (cols.mean(), rows.mean())
        rows, cols = np.nonzero(masks.any(axis=0))
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)
        return PartAnnotations(self.part_names, keypoints, visible, box, masks)

    def background_masks(self, index: int) -> np.ndarray:
        """(M, H, W) bool visible pixels of each background object (may be empty if hidden)."""
        return self._compose(index, (), ())[2]

    def num_background_objects(self, index: int) -> int:
        return len(self.layout(index).objects)

    def minimal_sufficient_parts(self, class_index: int) -> list[tuple[int, ...]]:
        """Minimal slot sets that tell class `class_index` apart from every other class."""
        if not 0 <= class_index < self.num_classes:
            raise IndexError(f"class_index {class_index} out of range [0, {self.num_classes})")
        return minimal_sufficient_sets(self.class_parts, class_index)

    def fingerprint(self) -> str:
        return stable_hash(
            {
                "generator_version": GENERATOR_VERSION,
                "name": self.name,
                "split": self.split,
                "num_classes": self.num_classes,
                "images_per_class": self.images_per_class,
                "image_size": self.image_size,
                "seed": self.seed,
                "slots": [[slot.name, [asdict(v) for v in slot.variants]] for slot in PART_SLOTS],
                "class_parts": self.class_parts.tolist(),
            }
        )
