"""Runner of consistency (Huang et al., ICCV 2023): part hits of each class prototype's box."""

from __future__ import annotations

import numpy as np
import torch

import protoquant.metrics.consistency as cons
from protoquant.metrics.common import PrototypeSlots, class_prototypes
from protoquant.metrics.context import EvalContext
from protoquant.metrics.maps import UPSAMPLING
from protoquant.metrics.result import MetricResult
from protoquant.metrics.settings import scaled


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
        "maps": "activation (softmax over prototypes), upsampled to the input size",
        "upsampling": UPSAMPLING["bicubic"] + " (the reference's cv2.resize INTER_CUBIC)",
        "box_half_size": scaled(settings.box_half_size, ctx.image_size),
        "box_half_size_at_224": settings.box_half_size,
        "parts": "all annotated parts, no left/right merging",
        "keypoints": "truncated to int, then x' = int(S * (int(x) / W)) (the reference's order)",
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
