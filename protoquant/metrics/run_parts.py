"""Runners of the keypoint protocols: consistency, stability (Huang et al.) and purity (PIP-Net)."""

from __future__ import annotations

import numpy as np
import torch

from protoquant.metrics import consistency as cons
from protoquant.metrics import purity as pur
from protoquant.metrics.common import PrototypeSlots, class_prototypes, part_groups
from protoquant.metrics.context import EvalContext
from protoquant.metrics.maps import argmax_column_major, argmax_row_major
from protoquant.metrics.result import MetricResult
from protoquant.metrics.settings import REFERENCE_SIZE, scaled


def _slots(ctx: EvalContext) -> PrototypeSlots:
    return class_prototypes(ctx.model.head.class_weights.detach().cpu(), ctx.settings.prototypes_per_class)


def _image_hits(
    ctx: EvalContext, activation: torch.Tensor, index: int, slot_ids: np.ndarray, slots
) -> torch.Tensor:
    """(s, P) part hits of the slots' prototypes on image `index`; activation (K, H, W)."""
    prototypes = torch.from_numpy(slots.prototypes[slot_ids])
    visible = torch.from_numpy(ctx.parts(index).visible.astype(bool))
    half = scaled(ctx.settings.box_half_size, ctx.image_size)
    return cons.slot_hits(
        activation, prototypes, ctx.input_keypoints(index), visible, size=ctx.image_size, half_size=half
    )


def _protocol(ctx: EvalContext, slots: PrototypeSlots) -> dict:
    settings = ctx.settings
    return {
        "prototype_rule": slots.rule,
        "num_slots": len(slots.classes),
        "maps": "activation (softmax over prototypes), OpenCV-equivalent bicubic to the input size",
        "box_half_size": scaled(settings.box_half_size, ctx.image_size),
        "box_half_size_at_224": settings.box_half_size,
        "parts": "all annotated parts, no left/right merging",
        "keypoints": "truncated to int, then x' = int(S * int(x) / W)",
    }


def run_consistency(ctx: EvalContext) -> MetricResult:
    """Consistency over all (class, prototype) slots; classes without test images count as inconsistent."""
    slots = _slots(ctx)
    num_parts = None
    hit_counts = visible_counts = None
    for indices, out in ctx.head_batches():
        for row, index in enumerate(indices.tolist()):
            slot_ids = slots.of_class(int(ctx.labels[index]))
            if not len(slot_ids):
                continue
            hits = _image_hits(ctx, out.activation[row], index, slot_ids, slots).numpy()
            if num_parts is None:
                num_parts = hits.shape[1]
                hit_counts = np.zeros((len(slots.classes), num_parts), np.int64)
                visible_counts = np.zeros_like(hit_counts)
            hit_counts[slot_ids] += hits
            visible_counts[slot_ids] += ctx.parts(index).visible.astype(np.int64)[None]
    if hit_counts is None:
        hit_counts = visible_counts = np.zeros((len(slots.classes), 1), np.int64)
    result = cons.consistency(hit_counts, visible_counts, ctx.settings.consistency_threshold)
    value = {
        "score": result.score,
        "num_consistent": int(result.consistent.sum()),
        "num_slots": result.num_slots,
        "mean_best_frequency": float(result.best_frequency.mean()) if result.num_slots else float("nan"),
    }
    protocol = {**_protocol(ctx, slots), "threshold": result.threshold}
    return MetricResult(value, protocol)


def _noisy_features(ctx: EvalContext, indices: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Features of the images plus seeded noise; the noise is drawn even when memoised (same stream)."""
    settings, size = ctx.settings, ctx.image_size
    noise = cons.input_noise(
        (len(indices), 3, size, size), generator, settings.noise_std, settings.noise_clip
    )
    position = {int(i): row for row, i in enumerate(indices)}

    def make(keys: list[tuple]) -> torch.Tensor:
        wanted = [key[-1] for key in keys]
        images = ctx.preprocess([ctx.dataset.load_image(i) for i in wanted], np.asarray(wanted))
        return images + noise[[position[i] for i in wanted]]

    tag = ("noise", settings.seed, settings.noise_std, settings.noise_clip, settings.batch_size)
    return ctx.memo_features([(*tag, int(i)) for i in indices], make)


def _stability_image(ctx, slots, slot_ids, index, outputs, with_parts: bool) -> tuple:
    """(hit vectors unchanged (s,) or None, |score change| (s,), argmax cell unchanged (s,))."""
    (clean, noisy), row = outputs
    prototypes = torch.from_numpy(slots.prototypes[slot_ids])
    unchanged = None
    if with_parts:
        hits = [_image_hits(ctx, o.activation[row], index, slot_ids, slots) for o in (clean, noisy)]
        unchanged = (hits[0] == hits[1]).all(dim=1).numpy()
    change = (noisy.scores[row, prototypes] - clean.scores[row, prototypes]).abs()
    cells = [argmax_row_major(o.activation[row, prototypes]) for o in (clean, noisy)]
    return unchanged, change, (cells[0][0] == cells[1][0]) & (cells[0][1] == cells[1][1])


def run_stability(ctx: EvalContext) -> MetricResult:
    """Stability of the part hits under input noise, plus the pooled scores' and argmax cells' stability.

    On a dataset without part annotations only the score and argmax-cell stability is reported.
    """
    slots, with_parts = _slots(ctx), ctx.dataset.has_parts
    same, seen = np.zeros(len(slots.classes)), np.zeros(len(slots.classes))
    score_change, cell_same = [], []
    generator = torch.Generator().manual_seed(ctx.settings.seed)
    for indices, clean in ctx.head_batches():
        noisy = ctx.head_output(_noisy_features(ctx, indices, generator))
        for row, index in enumerate(indices.tolist()):
            slot_ids = slots.of_class(int(ctx.labels[index]))
            if not len(slot_ids):
                continue
            unchanged, change, cell = _stability_image(
                ctx, slots, slot_ids, index, ((clean, noisy), row), with_parts
            )
            if unchanged is not None:
                same[slot_ids] += unchanged
            seen[slot_ids] += 1
            score_change.append(change)
            cell_same.append(cell)
    value = {
        "score": cons.stability(same, seen) if with_parts else float("nan"),
        "num_slots": len(slots.classes),
        "score_abs_change": float(torch.cat(score_change).mean()) if score_change else float("nan"),
        "argmax_cell_unchanged": float(torch.cat(cell_same).float().mean()) if cell_same else float("nan"),
    }
    protocol = {
        **_protocol(ctx, slots),
        "noise": f"N(0, {ctx.settings.noise_std}^2) clipped to +-{ctx.settings.noise_clip}, "
        "normalised input space, drawn per batch",
        "seed": ctx.settings.seed,
        "empty_class": "a slot whose class has no test images scores s_p = 0",
        "clean_features": "feature cache (float16); noisy features rounded to float16 as well",
        "extra": "score_abs_change / argmax_cell_unchanged: pooled scores and argmax latent cells "
        "of the same slots (grounding audit's noise check)",
        "parts": "all annotated parts" if with_parts else "none: the dataset has no parts, score not defined",
    }
    return MetricResult(value, protocol)


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
        fields = ("mean", "std", "num_pure", "num_prototypes", "num_with_images")
        value[name] = {k: getattr(summary, k) for k in fields}
        with_images = summary.purity[summary.image_counts > 0]
        value[name]["mean_with_images"] = float(with_images.mean()) if len(with_images) else float("nan")
    protocol = {
        "prototypes": f"max_c w[c, p] > {settings.purity_weight_threshold} (raw weights)",
        "top_k": settings.purity_top_k,
        "score_threshold": f"pooled > {settings.purity_score_threshold} (strict)",
        "patch": settings.purity_patch,
        "patch_rule": "PIP-Net get_img_coordinates; argmax cell column-first; bounds scaled to the image",
        "merged_parts": list(groups[0]),
        "images": f"{ctx.dataset.name}/{ctx.dataset.split} as loaded (protocol: uncropped CUB)",
        "deviation": None
        if ctx.image_size == REFERENCE_SIZE
        else f"input size {ctx.image_size}, patch kept at {settings.purity_patch} px",
    }
    return MetricResult(value, protocol)
