"""Explanations as data: which prototypes drove a decision, where they fired, what they stand for.

A class logit is a sum over prototypes of score x weight, so each prototype's contribution
is exact. The nearest training patches come from the prototype gallery (computed once from
the feature cache). Drawing lives in `protoquant.render`; nothing there runs a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import protoquant
from protoquant.backbones.stages import describe_scale
from protoquant.data.inputs import ImageInput, Images, is_batch
from protoquant.explain.gallery import resolve_gallery
from protoquant.explain.pictures import to_uint8
from protoquant.explain.types import (
    ClassExplanation,
    Explanation,
    Gallery,
    PatchRef,
    PrototypeEvidence,
    Report,
    TrainingPatch,
    cell_box,
)

BOX_QUANTILE = 0.95  # a prototype's box covers its peak's connected region at or above this quantile
PATCHES_PER_PROTOTYPE = 3  # nearest training patches referenced by each shown prototype
TILE_CACHE = "gallery_tiles"  # folder in the checkpoint where rendered gallery tiles are kept


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(K, H, W) -> (K, S, S) bicubic."""
    return F.interpolate(maps[None].float(), size=(size, size), mode="bicubic", align_corners=False)[0]


def high_activation_box(heatmap: np.ndarray, quantile: float = BOX_QUANTILE) -> tuple[int, int, int, int]:
    """Inclusive box (x1, y1, x2, y2) of the connected region >= the map's `quantile` around its peak."""
    regions, _ = ndimage.label(heatmap >= np.quantile(heatmap, quantile))
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    ys, xs = np.nonzero(regions == regions[peak])
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _evidence(
    prediction: protoquant.Prediction,
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
    cells = [divmod(peak, activation.shape[-1]) for peak in peaks]  # (h, w) of each peak
    grid = tuple(activation.shape[-2:])
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
            location=cells[i],
            similarity=similarity[i],
            activation=upsampled[i],
            box=cell_box(cells[i], grid, size),  # the same rule as the training side (`window`)
            cosine=float(prediction.similarity[index, k, cells[i][0], cells[i][1]]),
            patches=patches(k),
        )
        for i, k in enumerate(order)
    )


def _check_counts(top_classes: int, top_prototypes: int) -> None:
    if top_classes < 1 or top_prototypes < 1:
        raise ValueError(f"top_classes and top_prototypes must be >= 1, got {top_classes}, {top_prototypes}")


def _class_explanation(prediction, index, c, ranked, weights, classes, top_prototypes, image, patches):
    """ClassExplanation of class c for image `index`; weights = ((C, K) class weights, (K,) floor)."""
    class_weights, floor = weights
    scores, logits = prediction.scores[index], prediction.logits[index]  # (K,), (C,)
    runner_up = next((r for r in ranked if r != c), -1)
    rival = class_weights[runner_up] if runner_up >= 0 else class_weights[c]  # (K,)
    contributions = scores * class_weights[c]  # (K,)
    order = contributions.argsort(descending=True)[:top_prototypes].tolist()
    evidence = _evidence(prediction, index, (class_weights[c], floor, rival), order, image.shape[0], patches)
    logit = float(logits[c])
    return ClassExplanation(
        c,
        classes[c],
        float(prediction.probabilities[index, c]),
        logit,
        evidence,
        logit - sum(item.contribution for item in evidence),  # rest
        int((contributions > 0).sum()),
        float(scores @ floor),  # the class-agnostic part
        runner_up,
        logit - float(logits[runner_up]) if runner_up >= 0 else 0.0,  # margin
    )


def explain_prediction(
    prediction: protoquant.Prediction,
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

    floor = class_weights.amin(dim=0)  # (K,) weight every class gives prototype k
    ranked = prediction.probabilities[index].argsort(descending=True).tolist()
    shown = [
        _class_explanation(
            prediction, index, c, ranked, (class_weights, floor), classes, top_prototypes, image, patches
        )
        for c in ranked[:top_classes]
    ]
    return Explanation(image, tuple(prediction.activation.shape[-2:]), tuple(shown))


def explain(
    model: protoquant.ProtoQuant,
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


def load_patches(gallery: Gallery, refs: Iterable[PatchRef]) -> dict[tuple[int, int], TrainingPatch]:
    """Stored crops of `refs` keyed by (prototype, rank); no training image is read."""
    return {(ref.prototype, ref.rank): gallery.patch(ref) for ref in refs}


def model_facts(model: protoquant.ProtoQuant, gallery: Gallery) -> tuple[tuple[str, str], ...]:
    info, config = model.backbone.info, model.config
    return (
        ("backbone", f"{info.name} (weights: {Path(info.weights).name})"),
        (
            "input",
            f"{config.backbone.image_size} × {config.backbone.image_size} px, {gallery.grid[0]} × {gallery.grid[1]} grid",
        ),
        (
            "features",
            describe_scale(
                info.grid, info.stride, info.receptive_field, info.image_size, pool=config.cache.grid_pool
            ),
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
    model: protoquant.ProtoQuant,
    images: Sequence[tuple[str, ImageInput]],
    gallery: Gallery | None = None,
    *,
    metrics: dict | None = None,
    top_classes: int = 2,
    top_prototypes: int = 5,
    title: str = "ProtoQuant explanations",
) -> Report:
    """Explain `images` (name, picture) and load every gallery patch the report shows.

    Args:
        gallery: the prototype gallery; None reads the one stored in `model.checkpoint` (see `explain`).
            Its stored pictures supply every training patch: the training data is not read.
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
        load_patches(gallery, sorted(refs, key=lambda r: (r.prototype, r.rank))),
        str(model.checkpoint / TILE_CACHE) if model.checkpoint is not None else None,
    )
