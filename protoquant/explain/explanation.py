"""Explanations as data: which prototypes drove a decision, where they fired, what they stand for.

A class logit is a sum over prototypes of score x weight, so each prototype's contribution
is exact. The nearest training patches come from the prototype gallery (computed once from
the feature cache). Drawing lives in `protoquant.render`; nothing there runs a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from protoquant.data import ImageDataset
from protoquant.data.inputs import ImageInput, Images, is_batch
from protoquant.data.transforms import ViewTransform
from protoquant.explain.gallery import resolve_gallery, training_images
from protoquant.explain.types import (
    ClassExplanation,
    Explanation,
    Gallery,
    PatchRef,
    PrototypeEvidence,
    Report,
    TrainingPatch,
)

if TYPE_CHECKING:  # the model calls into this module, so its type is imported for hints only
    from protoquant.model import Prediction, ProtoQuant

BOX_QUANTILE = 0.95  # a prototype's box covers its peak's connected region at or above this quantile
PATCHES_PER_PROTOTYPE = 3  # nearest training patches referenced by each shown prototype
PATCH_CONTEXT_CELLS = 1  # grid cells of context kept around a training patch's cell


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(K, H, W) -> (K, S, S) bicubic."""
    return F.interpolate(maps[None].float(), size=(size, size), mode="bicubic", align_corners=False)[0]


def high_activation_box(heatmap: np.ndarray, quantile: float = BOX_QUANTILE) -> tuple[int, int, int, int]:
    """Inclusive box (x1, y1, x2, y2) of the connected region >= the map's `quantile` around its peak."""
    regions, _ = ndimage.label(heatmap >= np.quantile(heatmap, quantile))
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    ys, xs = np.nonzero(regions == regions[peak])
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def to_uint8(normalised: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) uint8 image."""
    pixels = normalised.detach().cpu().float().numpy().transpose(1, 2, 0)  # (S, S, 3)
    unit = np.clip(pixels * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32), 0, 1)
    return (unit * 255).round().astype(np.uint8)


def _evidence(
    prediction: Prediction,
    index: int,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    order: list[int],
    size: int,
    patches,
) -> tuple[PrototypeEvidence, ...]:
    """Evidence of prototypes `order` for one class; `patches(k)` gives its refs.

    Args:
        weights: (K,) each: the class's weights, the smallest weight over classes, the runner-up's.
    """
    weights, floor, runner_up = weights
    activation = prediction.activation[index, order]  # (k, H, W)
    peaks = activation.flatten(1).argmax(dim=1).tolist()  # (k,) flat h * W + w
    upsampled = upsample(activation, size).numpy()  # (k, S, S)
    similarity = upsample(prediction.similarity[index, order], size).numpy()  # (k, S, S)
    scores = prediction.scores[index]  # (K,)
    return tuple(
        PrototypeEvidence(
            prototype=k,
            score=float(scores[k]),
            weight=float(weights[k]),
            contribution=float(scores[k] * weights[k]),
            specific=float(scores[k] * (weights[k] - floor[k])),
            margin_contribution=float(scores[k] * (weights[k] - runner_up[k])),
            location=divmod(peaks[i], activation.shape[-1]),
            similarity=similarity[i],
            activation=upsampled[i],
            box=high_activation_box(upsampled[i]),
            patches=patches(k),
        )
        for i, k in enumerate(order)
    )


def _check_counts(top_classes: int, top_prototypes: int) -> None:
    if top_classes < 1 or top_prototypes < 1:
        raise ValueError(f"top_classes and top_prototypes must be >= 1, got {top_classes}, {top_prototypes}")


def explain_prediction(
    prediction: Prediction,
    index: int,
    class_weights: torch.Tensor,
    classes: Sequence[str],
    image: np.ndarray,
    *,
    top_classes: int = 1,
    top_prototypes: int = 5,
    gallery: Gallery | None = None,
    patches_per_prototype: int = PATCHES_PER_PROTOTYPE,
) -> Explanation:
    """Explanation of image `index` of a prediction (pure data in, data out; no model runs).

    Args:
        class_weights: (C, K) effective class weights the logits were computed with.
        image: (S, S, 3) uint8, the model's input; maps are upsampled to its size.
    """
    _check_counts(top_classes, top_prototypes)

    def patches(k: int) -> tuple[PatchRef, ...]:
        return gallery.patches(k, patches_per_prototype) if gallery is not None else ()

    scores, probabilities = prediction.scores[index], prediction.probabilities[index]  # (K,), (C,)
    logits = prediction.logits[index]  # (C,)
    floor = class_weights.amin(dim=0)  # (K,) weight every class gives prototype k
    agnostic = float(scores @ floor)
    ranked = probabilities.argsort(descending=True).tolist()
    shown = []
    for c in ranked[:top_classes]:
        runner_up = next((r for r in ranked if r != c), -1)
        rival = class_weights[runner_up] if runner_up >= 0 else class_weights[c]  # (K,)
        contributions = scores * class_weights[c]  # (K,)
        order = contributions.argsort(descending=True)[:top_prototypes].tolist()
        weights = (class_weights[c], floor, rival)
        evidence = _evidence(prediction, index, weights, order, image.shape[0], patches)
        logit = float(logits[c])
        rest = logit - sum(item.contribution for item in evidence)
        margin = logit - float(logits[runner_up]) if runner_up >= 0 else 0.0
        count = int((contributions > 0).sum())
        shown.append(
            ClassExplanation(
                c,
                classes[c],
                float(probabilities[c]),
                logit,
                evidence,
                rest,
                count,
                agnostic,
                runner_up,
                margin,
            )
        )
    return Explanation(image, tuple(prediction.activation.shape[-2:]), tuple(shown))


def explain(
    model: ProtoQuant,
    images: Images,
    *,
    top_classes: int = 1,
    top_prototypes: int = 5,
    gallery: Gallery | bool | None = None,
    patches_per_prototype: int = PATCHES_PER_PROTOTYPE,
) -> Explanation | list[Explanation]:
    """Explain the model's decision on one picture (-> Explanation) or a batch (-> list).

    Args:
        images: anything `ProtoQuant.predict` takes (PIL, uint8 numpy, uint8 or [0, 1] float tensors,
            lists of these).
        gallery: where each shown prototype's nearest training patches come from. None (default):
            the gallery stored in `model.checkpoint`; a FileNotFoundError says how to build it
            (`protoquant gallery --model DIR`) when there is none. A `Gallery`: that one (it must
            belong to `model`). False: no training patches (`PrototypeEvidence.patches` empty).
    """
    _check_counts(top_classes, top_prototypes)  # before any file is read
    gallery = resolve_gallery(model, gallery)
    batch = model.preprocess(images)  # (B, 3, S, S)
    prediction = model.predict_normalised(batch)
    class_weights = model.head.class_weights.detach().cpu()  # (C, K)
    explanations = [
        explain_prediction(
            prediction,
            index,
            class_weights,
            model.classes,
            to_uint8(batch[index], model.transform.mean, model.transform.std),
            top_classes=top_classes,
            top_prototypes=top_prototypes,
            gallery=gallery,
            patches_per_prototype=patches_per_prototype,
        )
        for index in range(len(batch))
    ]
    return explanations if is_batch(images) else explanations[0]


def _window(first: int, last: int, margin: int, size: int) -> int:
    """Start of a window of (last - first + 1 + 2 * margin) pixels around [first, last], kept inside [0, size)."""
    return min(max(0, first - margin), max(0, size - (last - first + 1 + 2 * margin)))


def crop_patch(view: np.ndarray, ref: PatchRef, grid: tuple[int, int]) -> TrainingPatch:
    """Cut `ref`'s cell with PATCH_CONTEXT_CELLS of context on each side out of its (S, S, 3) view.

    Every crop has the same size: at the image border the window shifts inwards instead of shrinking.
    """
    size = view.shape[0]
    x1, y1, x2, y2 = ref.box
    margin_x, margin_y = PATCH_CONTEXT_CELLS * size // grid[1], PATCH_CONTEXT_CELLS * size // grid[0]
    left, top = _window(x1, x2, margin_x, size), _window(y1, y2, margin_y, size)
    width, height = x2 - x1 + 1 + 2 * margin_x, y2 - y1 + 1 + 2 * margin_y
    crop = view[top : top + height, left : left + width].copy()
    return TrainingPatch(ref, crop, (x1 - left, y1 - top, x2 - left, y2 - top))


def load_patches(
    gallery: Gallery, refs: Iterable[PatchRef], dataset: ImageDataset | None = None
) -> dict[tuple[int, int], TrainingPatch]:
    """Crops of `refs` keyed by (prototype, rank); each training image is loaded once.

    Args:
        dataset: the training split; by default loaded from the gallery's recorded data config.
    """
    refs = list(refs)
    dataset = dataset if dataset is not None else training_images(gallery)
    transform = ViewTransform(**gallery.source.transform)
    views: dict[int, np.ndarray] = {}
    out = {}
    for ref in refs:
        if ref.image not in views:
            tensor = transform(dataset.load_image(ref.image).convert("RGB"), ref.image, 0)  # (3, S, S)
            views[ref.image] = to_uint8(tensor, transform.mean, transform.std)
        out[ref.prototype, ref.rank] = crop_patch(views[ref.image], ref, gallery.grid)
    return out


def model_facts(model: ProtoQuant, gallery: Gallery) -> tuple[tuple[str, str], ...]:
    info, config = model.backbone.info, model.config
    return (
        ("backbone", f"{info.name} (weights: {Path(info.weights).name})"),
        (
            "input",
            f"{config.backbone.image_size} × {config.backbone.image_size} px, {gallery.grid[0]} × {gallery.grid[1]} grid",
        ),
        ("prototypes", f"K = {model.head.num_prototypes}, temperature τ = {model.head.temperature:g}"),
        (
            "data",
            f"{config.data.dataset}: {gallery.source.num_images} training images, {len(model.classes)} classes",
        ),
    )


def read_run_metrics(checkpoint: str | Path) -> dict:
    """The run's `metrics.json` beside the checkpoint folder, or {} where there is none."""
    path = Path(checkpoint).parent / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def build_report(
    model: ProtoQuant,
    images: Sequence[tuple[str, ImageInput]],
    gallery: Gallery | None = None,
    *,
    metrics: dict | None = None,
    top_classes: int = 2,
    top_prototypes: int = 5,
    dataset: ImageDataset | None = None,
    title: str = "ProtoQuant explanations",
) -> Report:
    """Explain `images` (name, picture) and load every gallery patch the report shows.

    Args:
        gallery: the prototype gallery; None reads the one stored in `model.checkpoint` (see `explain`).
    """
    gallery = resolve_gallery(model, gallery)
    if gallery is None:
        raise ValueError(
            "a report shows training patches: it needs a gallery (gallery=False is not accepted)"
        )
    explanations = tuple(
        (name, explain(model, image, top_classes=top_classes, top_prototypes=top_prototypes, gallery=gallery))
        for name, image in images
    )
    shown = {ref for _, e in explanations for c in e.classes for p in c.prototypes for ref in p.patches}
    refs = shown | {ref for k in gallery.weighted_prototypes() for ref in gallery.patches(k)}
    return Report(
        title,
        model_facts(model, gallery),
        metrics or {},
        explanations,
        gallery,
        load_patches(gallery, sorted(refs, key=lambda r: (r.prototype, r.rank)), dataset),
    )
