"""Runner of part purity (Nauta et al., PIP-Net, CVPR 2023): top-k and all@0.5 variants."""

from __future__ import annotations

import numpy as np
import torch

import protoquant.metrics.purity as pur
from protoquant.metrics.common import part_groups
from protoquant.metrics.context import EvalContext
from protoquant.metrics.maps import argmax_column_major
from protoquant.metrics.result import MetricResult
from protoquant.metrics.settings import REFERENCE_SIZE


def _purity_inputs(ctx: EvalContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled scores (N, K), argmax cells (N, K, 2) (column-first ties) and image ids (N,)."""
    scores, cells, images = [], [], []
    for indices, out in ctx.head_batches():
        rows, cols = argmax_column_major(out.activation)  # (B, K) each
        scores.append(out.scores.numpy())
        cells.append(torch.stack([rows, cols], dim=-1).numpy().astype(np.int16))
        images.append(indices)
    return np.concatenate(scores), np.concatenate(cells), np.concatenate(images)


def _part_table(ctx: EvalContext, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints (N, P, 2) and visibility (N, P) in image pixels, image sizes (N, 2) (height, width)."""
    parts = [ctx.parts(int(i)) for i in images]
    keypoints = np.stack([p.keypoints for p in parts]).astype(np.float64)
    visible = np.stack([p.visible for p in parts]).astype(bool)
    return keypoints, visible, np.array([p.image_hw for p in parts], dtype=np.float64)


def _variant_purity(
    ctx: EvalContext, inputs: tuple, table: tuple, counted: np.ndarray, select, groups: tuple
) -> pur.PuritySummary:
    """Purity of every counted prototype on the images `select(scores of p)` picks."""
    (scores, cells, _), (keypoints, visible, image_hw), (group_names, group_of) = inputs, table, groups
    values, best, counts = [], [], []
    for p in counted:
        chosen = select(scores[:, p])
        cell = cells[chosen, p].astype(np.int64)  # (n, 2)
        boxes = pur.patch_boxes(
            cell, ctx.store.grid, image_hw[chosen], ctx.image_size, ctx.settings.purity_patch
        )
        hits, seen = pur.group_hits(boxes, keypoints[chosen], visible[chosen], group_of, len(group_names))
        value, part = pur.prototype_purity(hits, seen)
        values.append(value)
        best.append(part)
        counts.append(len(chosen))
    return pur.summarise(np.asarray(values, float), np.asarray(best, np.int64), np.asarray(counts))


def run_purity(ctx: EvalContext) -> MetricResult:
    """Part purity, top-k and all@0.5 variants, left/right parts merged."""
    settings = ctx.settings
    weights = ctx.model.head.class_weights.detach().cpu()
    counted = np.flatnonzero((weights.amax(dim=0) > settings.purity_weight_threshold).numpy())
    inputs = _purity_inputs(ctx)  # scores (N, K), cells (N, K, 2), image ids (N,)
    if not len(inputs[2]):
        raise ValueError(f"metric 'purity': {ctx.dataset.name}/{ctx.dataset.split} has no images")
    table = _part_table(ctx, inputs[2])
    groups = part_groups(ctx.parts(int(inputs[2][0])).part_names, merge_left_right=True)
    variants = {
        "top_k": lambda s: pur.top_k_images(s, settings.purity_top_k),
        "all_above": lambda s: pur.images_above(s, settings.purity_score_threshold),
    }
    value = {}
    for name, select in variants.items():
        summary = _variant_purity(ctx, inputs, table, counted, select, groups)
        fields = ("mean", "std", "mean_all", "std_all", "num_pure", "num_prototypes", "num_with_images")
        value[name] = {k: getattr(summary, k) for k in fields}
    protocol = {
        "prototypes": f"max_c w[c, p] > {settings.purity_weight_threshold} (raw weights)",
        "top_k": settings.purity_top_k,
        "score_threshold": f"pooled > {settings.purity_score_threshold} (strict)",
        "headline": "mean / std (ddof 0) over the counted prototypes with >= 1 selected image, as the "
        "reference (it writes rows only for selected images)",
        "extra": "mean_all / std_all: every counted prototype, one without selected images scored 0",
        "patch": settings.purity_patch,
        "patch_rule": "PIP-Net get_img_coordinates; argmax cell column-first; bounds scaled to the image",
        "upsampling": "none: the argmax latent cell's patch (no map is upsampled)",
        "merged_parts": list(groups[0]),
        "images": f"{ctx.dataset.name}/{ctx.dataset.split} as loaded (protocol: uncropped CUB)",
        "deviation": None
        if ctx.image_size == REFERENCE_SIZE
        else f"input size {ctx.image_size}, patch kept at {settings.purity_patch} px",
    }
    return MetricResult(value, protocol)
