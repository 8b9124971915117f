"""Explanation data: plain frozen dataclasses, computed by `protoquant.explain`, drawn by `render`.

Nothing here runs a model, so the drawing code can import these types without reaching the
model or the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protoquant.config import WEIGHT_THRESHOLD


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
    classes: tuple[str, ...]
    grid: tuple[int, int]  # (H, W) feature grid
    image_size: int  # S, side of the model's input
    model_hash: str  # hash of the codebook and class weights it was built for
    source: GallerySource

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
        )

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
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) high-activation region, inclusive pixels
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
    crop: np.ndarray  # (h, w, 3) uint8 region around the cell
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
