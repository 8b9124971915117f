"""Explanation data: plain frozen dataclasses, computed by `protoquant.explain`, drawn by `render`.

Nothing here runs a model, so the drawing code can import these types without reaching the
model or the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from protoquant.config import WEIGHT_THRESHOLD

WINDOW_CONTEXT = 1  # grid cells of context on each side of a patch's cell, test and training side alike
CROP_SIDE = 64  # px, side of every window crop, stored and shown (test and training side: one zoom)
SOURCE_SIDE = 96  # px, side of a stored source-image thumbnail
SCALE_LOW_QUANTILE = 0.5  # heatmap colour scale starts at this quantile of the source images' cosines


@dataclass(frozen=True)
class PatchRef:
    """One training patch a prototype stands for: cell `cell` of view 0 of training image `image`."""

    prototype: int  # k
    rank: int  # 0 = the most similar training image
    image: int  # index into the training split (load_splits(data, seed).train)
    entry: int  # feature-cache entry of that image's view 0
    cell: tuple[int, int]  # (h, w) on the feature grid
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the cell in the (S, S) view, inclusive
    similarity: float  # cosine similarity of prototype k to this patch
    label: int  # class index of the training image
    file: str  # the training image's file (relative to the dataset root); "" for generated data


@dataclass(frozen=True)
class GallerySource:
    """Where the gallery's image indices point: the training split of `data` under `seed`."""

    data: dict  # DataConfig as a plain dict
    seed: int
    cache: str  # training feature cache folder the gallery was computed from
    dataset_fingerprint: str  # fingerprint of the training split when the cache was built
    num_images: int  # images in the training split
    transform: dict  # ViewTransform fields (view 0 shows what the cache saw)


@dataclass(frozen=True)
class Gallery:
    """Nearest training patches, usage and class weights of all K prototypes."""

    similarity: torch.Tensor  # (K, T) float32, descending along T
    entry: torch.Tensor  # (K, T) int64 cache entry
    image: torch.Tensor  # (K, T) int64 training image index
    cell: torch.Tensor  # (K, T) int64 flat cell h * W + w
    usage: torch.Tensor  # (K,) int64 training patches (view 0) whose nearest prototype is k
    class_weights: torch.Tensor  # (C, K) effective class weights, all >= 0
    label: torch.Tensor  # (K, T) int64 class of each training image
    source_similarity: torch.Tensor  # (K, H, W) cosine map of prototype k on its nearest image (rank 0)
    classes: tuple[str, ...]
    grid: tuple[int, int]  # (H, W) feature grid
    image_size: int  # S, side of the model's input
    model_hash: str  # hash of the codebook and class weights it was built for
    source: GallerySource
    files: dict[int, str]  # training image index -> file ("" or absent for generated data)
    pictures: GalleryPictures  # pixels of every patch and source image, so no training data is needed

    @property
    def num_prototypes(self) -> int:
        return int(self.similarity.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.similarity.shape[1])

    def patches(self, prototype: int, limit: int | None = None) -> tuple[PatchRef, ...]:
        """The nearest training patches of `prototype`, most similar first."""
        if not 0 <= prototype < self.num_prototypes:
            raise IndexError(f"prototype {prototype} outside the gallery's 0..{self.num_prototypes - 1}")
        return tuple(self._ref(prototype, t) for t in range(min(limit or self.top_k, self.top_k)))

    def _ref(self, k: int, t: int) -> PatchRef:
        row, col = divmod(int(self.cell[k, t]), self.grid[1])
        return PatchRef(
            k,
            t,
            int(self.image[k, t]),
            int(self.entry[k, t]),
            (row, col),
            cell_box((row, col), self.grid, self.image_size),
            float(self.similarity[k, t]),
            int(self.label[k, t]),
            self.files.get(int(self.image[k, t]), ""),
        )

    def patch(self, ref: PatchRef) -> TrainingPatch:
        """The stored pixels of a patch `patches` returned: its window crop, cell outlined."""
        crop = self.pictures.crops[ref.prototype, ref.rank]  # (c, c, 3)
        return TrainingPatch(
            ref, crop, scaled_box(window(ref.cell, self.grid, self.image_size), crop.shape[0])
        )

    def source_picture(self, prototype: int) -> SourcePicture:
        """Prototype k's nearest training image (rank 0) with its cosine map and patch cell."""
        ref = self._ref(prototype, 0)
        thumbnail = self.pictures.sources[prototype]  # (s, s, 3)
        side = thumbnail.shape[0]
        x1, y1, x2, y2 = ref.box
        scale = side / self.image_size
        box = (int(x1 * scale), int(y1 * scale), int((x2 + 1) * scale) - 1, int((y2 + 1) * scale) - 1)
        return SourcePicture(ref, thumbnail, self.source_similarity[prototype].numpy(), box)

    @property
    def cosine_range(self) -> tuple[float, float]:
        """(low, high) of the one colour scale every heatmap of this model is drawn on: the median
        cosine on the prototypes' source images (lower values share the lowest colour) up to the
        highest cosine of any gallery patch."""
        low = float(self.source_similarity.float().quantile(SCALE_LOW_QUANTILE))
        high = float(self.similarity.max())
        return (low, high) if high > low else (low, low + 1.0)

    def weighting_classes(self, prototype: int) -> tuple[tuple[int, float], ...]:
        """(class index, weight) of every class weighting `prototype` above WEIGHT_THRESHOLD, largest first."""
        column = self.class_weights[:, prototype]  # (C,)
        order = column.argsort(descending=True).tolist()
        return tuple((c, float(column[c])) for c in order if column[c] > WEIGHT_THRESHOLD)

    def weighted_prototypes(self) -> tuple[int, ...]:
        """Prototypes some class weights above WEIGHT_THRESHOLD, by their largest weight (descending)."""
        largest = self.class_weights.amax(dim=0)  # (K,)
        order = largest.argsort(descending=True).tolist()
        return tuple(k for k in order if largest[k] > WEIGHT_THRESHOLD)

    def check(self, model_hash: str) -> None:
        """Raise unless the gallery was built for the model with this hash (`gallery.model_hash`)."""
        if model_hash != self.model_hash:
            raise ValueError(
                "the prototype gallery was built for another model (codebook or class weights differ); "
                "rebuild it with `protoquant gallery --model CHECKPOINT`"
            )


def cell_box(cell: tuple[int, int], grid: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x1, y1, x2, y2) of grid cell (h, w) in an (S, S) image."""
    (row, col), (height, width) = cell, grid
    x1, x2 = col * size // width, (col + 1) * size // width - 1
    y1, y2 = row * size // height, (row + 1) * size // height - 1
    return x1, y1, max(x1, x2), max(y1, y2)


@dataclass(frozen=True)
class Window:
    """The one localisation rule for both sides of "this looks like that": the peak cell with
    WINDOW_CONTEXT cells of context on each side, shifted inwards at the image border."""

    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the window in the (S, S) image, inclusive
    cell: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the cell inside the window, inclusive


def _start(first: int, last: int, span: int, size: int) -> int:
    """Start of a `span`-pixel window centred on [first, last], shifted inwards to stay in [0, size)."""
    return min(max(0, (first + last + 1 - span) // 2), size - span)


def window(cell: tuple[int, int], grid: tuple[int, int], size: int) -> Window:
    """Window of grid cell (h, w) in an (S, S) image: every window of a model has the same size,
    (2 * WINDOW_CONTEXT + 1) cells (rounded up to whole pixels), at most the image."""
    x1, y1, x2, y2 = cell_box(cell, grid, size)
    cells = 2 * WINDOW_CONTEXT + 1
    span_x, span_y = min(size, -(-cells * size // grid[1])), min(size, -(-cells * size // grid[0]))
    left, top = _start(x1, x2, span_x, size), _start(y1, y2, span_y, size)
    box = (left, top, left + span_x - 1, top + span_y - 1)
    return Window(box, (x1 - left, y1 - top, x2 - left, y2 - top))


def scaled_box(place: Window, side: int) -> tuple[int, int, int, int]:
    """The cell box of `place` in its window crop resized to (side, side) pixels, inclusive."""
    x1, y1, x2, y2 = place.box
    sx, sy = side / (x2 - x1 + 1), side / (y2 - y1 + 1)
    cx1, cy1, cx2, cy2 = place.cell
    return int(cx1 * sx), int(cy1 * sy), int((cx2 + 1) * sx) - 1, int((cy2 + 1) * sy) - 1


def cut_window(image: np.ndarray, place: Window, side: int) -> np.ndarray:
    """(S, S, 3) uint8 image -> (side, side, 3) uint8 crop of `place`'s window (both sides: one zoom)."""
    x1, y1, x2, y2 = place.box
    crop = Image.fromarray(np.ascontiguousarray(image[y1 : y2 + 1, x1 : x2 + 1]))
    return np.asarray(crop.resize((side, side), Image.Resampling.BICUBIC))


def window_crop(image: np.ndarray, cell: tuple[int, int], grid: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """(S, S, 3) uint8 image -> ((CROP_SIDE, CROP_SIDE, 3) crop of cell (h, w)'s window, its cell box)."""
    place = window(cell, grid, image.shape[0])
    return cut_window(image, place, CROP_SIDE), scaled_box(place, CROP_SIDE)


@dataclass(frozen=True)
class GalleryPictures:
    """Small pictures cut once when the gallery is built, stored in the checkpoint folder."""

    crops: np.ndarray  # (K, T, c, c, 3) uint8 window crop of each gallery patch, c = CROP_SIDE
    sources: np.ndarray  # (K, s, s, 3) uint8 each prototype's nearest training image, s = SOURCE_SIDE


@dataclass(frozen=True)
class SourcePicture:
    """A prototype's own source image: its nearest training image, as ProtoPNet's local view shows it."""

    ref: PatchRef  # the rank-0 patch
    image: np.ndarray  # (s, s, 3) uint8 thumbnail of the training image (view 0)
    similarity: np.ndarray  # (H, W) float32 cosine map of the prototype on that image
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the patch cell in the thumbnail, inclusive


@dataclass(frozen=True)
class PrototypeEvidence:
    """How one prototype k adds to one class's logit, and where it fired."""

    prototype: int  # k
    score: float  # pooled presence of prototype k: the spatial max of its activation
    weight: float  # class weight w[c, k] >= 0
    contribution: float  # score * weight; all K of them sum to the class logit
    specific: float  # score * (w[c, k] - min_c' w[c', k]): the part no other class also receives
    margin_contribution: float  # score * (w[c, k] - w[r, k]) with r the runner-up class (0 if none)
    location: tuple[int, int]  # (h, w) grid cell where the activation peaks
    similarity: np.ndarray  # (S, S) float32 cosine similarity map, upsampled to the image
    activation: np.ndarray  # (S, S) float32 activation map (softmax over prototypes), upsampled
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the peak cell `location`, inclusive pixels
    cosine: float  # cosine similarity of prototype k to the test patch at `location`
    patches: tuple[PatchRef, ...]  # nearest training patches (empty when no gallery was given)


@dataclass(frozen=True)
class ClassExplanation:
    class_index: int
    class_name: str
    probability: float
    logit: float
    prototypes: tuple[PrototypeEvidence, ...]  # the top prototypes by contribution, largest first
    rest: float  # logit minus the shown contributions: what all other prototypes add
    num_contributing: int  # prototypes with a positive contribution to this logit
    agnostic: float  # sum_k score_k * min_c w[c, k]: added to every class alike, moves no probability
    runner_up: int  # index of the next most probable class (-1 when the model has one class)
    margin: float  # logit minus the runner-up's logit (0 when there is none)

    @property
    def specific_logit(self) -> float:
        """The logit without its class-agnostic part: what separates this class from the others."""
        return self.logit - self.agnostic

    @property
    def shown_share(self) -> float:
        """Share of the class-specific logit carried by the shown prototypes (nan when it is 0)."""
        total = self.specific_logit
        return sum(p.specific for p in self.prototypes) / total if total > 0 else float("nan")

    @property
    def shown_margin_share(self) -> float:
        """Share of the margin over the runner-up carried by the shown prototypes (nan when it is <= 0)."""
        return (
            sum(p.margin_contribution for p in self.prototypes) / self.margin
            if self.margin > 0
            else float("nan")
        )


@dataclass(frozen=True)
class Explanation:
    image: np.ndarray  # (S, S, 3) uint8, the image as the model saw it
    grid: tuple[int, int]  # (H, W) feature grid
    classes: tuple[ClassExplanation, ...]  # top classes by probability, the prediction first

    @property
    def predicted(self) -> ClassExplanation:
        return self.classes[0]


@dataclass(frozen=True)
class TrainingPatch:
    """Pixels of a training patch, for display."""

    ref: PatchRef
    crop: np.ndarray  # (c, c, 3) uint8 window around the cell (see `window`)
    cell_box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the cell inside `crop`, inclusive


@dataclass(frozen=True)
class Report:
    """Everything the HTML report shows, computed beforehand (the renderer runs no model)."""

    title: str
    facts: tuple[tuple[str, str], ...]  # (label, value) facts about the model
    metrics: dict  # the run's metrics.json, {} where there is none
    explanations: tuple[tuple[str, Explanation], ...]  # (image name, explanation)
    gallery: Gallery
    patches: dict[tuple[int, int], TrainingPatch]  # (prototype, rank) -> crop
    tile_cache: str | None  # folder where gallery tiles are kept between reports (None: none)
