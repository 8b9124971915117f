"""Explanations as data: which prototypes drove a decision, where they fired, how much.

A class logit is a sum over prototypes of score x weight, so each prototype's
contribution is exact. Drawing lives in `protoquant.render`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from protoquant.model import ProtoQuant

BOX_QUANTILE = 0.95  # a prototype's box covers the pixels at or above this quantile of its upsampled map


@dataclass(frozen=True)
class PrototypeEvidence:
    prototype: int  # k
    score: float  # pooled presence of prototype k in the image
    weight: float  # class weight w[c, k]
    contribution: float  # score * weight; these sum to the class logit
    heatmap: np.ndarray  # (S, S) float32 activation map of k, upsampled to the model's input
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) high-activation region, inclusive pixel bounds


@dataclass(frozen=True)
class ClassExplanation:
    class_index: int
    class_name: str
    probability: float
    logit: float
    prototypes: tuple[PrototypeEvidence, ...]  # sorted by contribution, largest first


@dataclass(frozen=True)
class Explanation:
    image: np.ndarray  # (S, S, 3) uint8, the image as the model saw it
    classes: tuple[ClassExplanation, ...]  # top classes by probability


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(K, H, W) -> (K, S, S) bicubic."""
    return F.interpolate(maps[None], size=(size, size), mode="bicubic", align_corners=False)[0]


def high_activation_box(heatmap: np.ndarray, quantile: float = BOX_QUANTILE) -> tuple[int, int, int, int]:
    """Inclusive bounding box (x1, y1, x2, y2) of pixels >= the map's `quantile`."""
    ys, xs = np.nonzero(heatmap >= np.quantile(heatmap, quantile))
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def explain(
    model: ProtoQuant, image: Image.Image, *, top_classes: int = 1, top_prototypes: int = 5
) -> Explanation:
    """Explain the model's decision on one PIL image."""
    size = model.config.backbone.image_size
    batch = model.preprocess([image])  # (1, 3, S, S)
    prediction = model.predict_normalised(batch)
    probabilities = prediction.probabilities[0]
    weights = model.head.class_weights.detach().cpu()  # (C, K)
    scores = prediction.scores[0]  # (K,)
    shown = []
    for class_index in probabilities.argsort(descending=True)[:top_classes].tolist():
        contributions = scores * weights[class_index]  # (K,)
        order = contributions.argsort(descending=True)[:top_prototypes].tolist()
        maps = upsample(prediction.activation[0, order], size).numpy()  # (k, S, S)
        evidence = tuple(
            PrototypeEvidence(
                k,
                float(scores[k]),
                float(weights[class_index, k]),
                float(contributions[k]),
                maps[i],
                high_activation_box(maps[i]),
            )
            for i, k in enumerate(order)
        )
        shown.append(
            ClassExplanation(
                class_index,
                model.classes[class_index],
                float(probabilities[class_index]),
                float(prediction.logits[0, class_index]),
                evidence,
            )
        )
    return Explanation(to_uint8(batch[0], model.transform.mean, model.transform.std), tuple(shown))


def to_uint8(normalised: torch.Tensor, mean: tuple, std: tuple) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) uint8 image."""
    unit = (normalised * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    return (unit.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


PATCH_CONTEXT_CELLS = 1  # cells of context shown around a nearest training patch


@dataclass(frozen=True)
class TrainingPatch:
    """A training image region a prototype stands for (for display)."""

    image_index: int
    cell: tuple[int, int]  # (h, w) on the feature grid
    crop: np.ndarray  # (h, w, 3) uint8 region around the cell
    cell_box: tuple[int, int, int, int]  # (x1, y1, x2, y2) of the cell inside `crop`, inclusive
    cosine: float  # similarity of the prototype to this patch


def training_patch(
    dataset, image_index: int, cell: int, grid: tuple[int, int], transform, cosine: float
) -> TrainingPatch:
    """Crop cell `cell` (flat h * W + w) of training image `image_index`, as view 0 shows it."""
    pixels = to_uint8(
        transform(dataset.load_image(image_index), image_index, 0), transform.mean, transform.std
    )
    size = pixels.shape[0]
    row, col = divmod(int(cell), grid[1])
    cell_h, cell_w = size / grid[0], size / grid[1]
    y1, y2 = (
        int(max(0, (row - PATCH_CONTEXT_CELLS) * cell_h)),
        int(min(size, (row + 1 + PATCH_CONTEXT_CELLS) * cell_h)),
    )
    x1, x2 = (
        int(max(0, (col - PATCH_CONTEXT_CELLS) * cell_w)),
        int(min(size, (col + 1 + PATCH_CONTEXT_CELLS) * cell_w)),
    )
    box = (
        int(col * cell_w) - x1,
        int(row * cell_h) - y1,
        int((col + 1) * cell_w) - x1 - 1,
        int((row + 1) * cell_h) - y1 - 1,
    )
    return TrainingPatch(image_index, (row, col), pixels[y1:y2, x1:x2].copy(), box, float(cosine))
