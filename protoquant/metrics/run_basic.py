"""Runners that need only cached features: accuracy, explanation size, grounding audit."""

from __future__ import annotations

import numpy as np
import torch

from protoquant.grounding import nearest_patches
from protoquant.metrics import grounding, size
from protoquant.metrics.context import EvalContext
from protoquant.metrics.result import MetricResult
from protoquant.train import Subset


def run_accuracy(ctx: EvalContext) -> MetricResult:
    """Top-1 accuracy on the cached split."""
    correct = 0
    for indices, out in ctx.head_batches():
        correct += int((out.logits.argmax(dim=1).numpy() == ctx.labels[indices]).sum())
    count = len(ctx.dataset)
    return MetricResult(correct / count if count else float("nan"), {"num_images": count})


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


def _usage(ctx: EvalContext, train: Subset) -> np.ndarray:
    counts = torch.zeros(ctx.model.head.num_prototypes, dtype=torch.long)
    head = ctx.model.head
    for features, _ in train.store.batches(train.entries, ctx.settings.batch_size):
        with torch.no_grad():
            similarity = head(features.to(ctx.device)).similarity.cpu()  # (B, K, H, W)
        counts += grounding.usage_from_similarity(similarity)
    return counts.numpy()


def run_grounding(ctx: EvalContext) -> MetricResult:
    """Nearest training patch, usage, dead and duplicate prototypes (needs the training cache)."""
    if ctx.train is None:
        raise ValueError("metric 'grounding' needs cached training features: pass train= to evaluate_metrics")
    head, settings = ctx.model.head, ctx.settings
    prototypes = head.codebook.detach().cpu()  # (K, D)
    nearest = nearest_patches(prototypes, ctx.train, settings.batch_size, ctx.device)
    usage = _usage(ctx, ctx.train)
    duplicates = grounding.duplicate_of(prototypes, settings.duplicate_cosine)
    explaining = (head.class_weights.detach().cpu().amax(dim=0) > settings.size_threshold).numpy()
    cosine = nearest.cosine.numpy()
    summary = grounding.summarise(cosine, usage, duplicates, explaining)
    images = ctx.train.store.image_index[nearest.entry.numpy()]
    rows = tuple(
        {
            "prototype": k,
            "nearest_cosine": float(cosine[k]),
            "nearest_image": int(images[k]),
            "nearest_cell": int(nearest.cell[k]),
            "usage": int(usage[k]),
            "dead": bool(usage[k] == 0),
            "duplicate_of": int(duplicates[k]),
            "explaining": bool(explaining[k]),
        }
        for k in range(len(cosine))
    )
    protocol = {
        "patches": "view 0 of every training image (cached), all cells",
        "usage": "training patches whose most similar prototype is k",
        "duplicate_cosine": settings.duplicate_cosine,
        "explaining": f"max_c w[c, p] > {settings.size_threshold}",
    }
    return MetricResult(summary, protocol, rows)
