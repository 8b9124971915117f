"""Runner of the explanation sizes (global, local, per class; METRICS.md)."""

from __future__ import annotations

import torch

import protoquant.metrics.size as size
from protoquant.metrics.context import EvalContext
from protoquant.metrics.result import MetricResult


def run_size(ctx: EvalContext) -> MetricResult:
    """Global / local / per-class explanation size and sparsity (thresholds applied once)."""
    settings = ctx.settings
    weights = ctx.model.head.class_weights.detach().cpu()  # (C, K), read only
    local = []
    for _, out in ctx.head_batches():
        predicted = out.logits.argmax(dim=1)
        local.append(size.local_sizes(out.scores, weights, predicted, settings.size_threshold))
    sizes = size.explanation_size(
        weights,
        torch.cat(local) if local else torch.zeros(0),
        threshold=settings.size_threshold,
        per_class_threshold=settings.per_class_threshold,
    )
    protocol = {
        "threshold": settings.size_threshold,
        "per_class_threshold": settings.per_class_threshold,
        "local_size": "predicted class per image, |score x w| > threshold, raw weights",
        "deviation": "none: thresholds applied once, weights never modified (PIP-Net's per-batch "
        "1e-3 subtraction is a bug and is not reproduced)",
    }
    return MetricResult(sizes, protocol)
