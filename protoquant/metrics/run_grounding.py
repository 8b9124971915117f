"""Runner of the grounding audit: nearest training patch, usage, dead and duplicate prototypes."""

from __future__ import annotations

import numpy as np
import torch

import protoquant.metrics.grounding as grounding
from protoquant.cache.view import CacheView
from protoquant.explain.grounding import nearest_patches
from protoquant.metrics.context import EvalContext
from protoquant.metrics.result import MetricResult


def _usage(ctx: EvalContext, train: CacheView) -> np.ndarray:
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
