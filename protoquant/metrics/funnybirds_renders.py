"""FunnyBirds re-renders: featurised `batch_size` at a time through the memo, and priced in advance.

A key is ("fb", image, removed parts, removed background objects); the all-parts re-render
(nothing removed) is planned only where the dataset has one. The head turns each batch of
features into logits at once, so memory is that of one batch whatever an image plans.
"""

from __future__ import annotations

import numpy as np
import torch

from protoquant.data.base import ImageDataset, SubsetDataset
from protoquant.metrics.context import EvalContext
from protoquant.metrics.cost import CALIBRATION_IMAGES, CostEstimate, PassCount, seconds_per_image


def base_dataset(dataset: ImageDataset, index: int) -> tuple[ImageDataset, int]:
    while isinstance(dataset, SubsetDataset):
        dataset, index = dataset.parent, int(dataset.indices[index])
    return dataset, index


def renders(ctx: EvalContext):
    """`make_images` for the memo: keys ("fb", index, parts, background) -> (n, 3, S, S) re-renders."""

    def make(keys: list[tuple]) -> torch.Tensor:
        pictures = []
        for *_, index, parts, background in keys:
            base, base_index = base_dataset(ctx.dataset, index)
            if not parts and not background:  # the all-parts re-render (planned only where it exists)
                pictures.append(base.intervention(base_index, []))
                continue
            pictures.append(
                base.render(base_index, remove_parts=list(parts), remove_background=list(background))
            )
        return ctx.preprocess(pictures, np.array([k[-3] for k in keys]))

    return make


def intervention_logits(ctx: EvalContext, images: list, plans: list[dict]) -> dict:
    """{(index, parts, background): (C,) logits} of every planned re-render, `batch_size` at a time."""
    wanted = [(image.index, *key) for image, plan in zip(images, plans) for key in plan["keys"]]
    logits, make, size = {}, renders(ctx), ctx.settings.batch_size
    for start in range(0, len(wanted), size):
        chunk = wanted[start : start + size]
        features = ctx.memo_features([("fb", *w) for w in chunk], make)
        logits.update(zip(chunk, ctx.head_output(features).logits.double().numpy()))  # (R, C)
    return logits


def renders_estimate(
    ctx: EvalContext, images: int, keys: list[tuple], planned: int, planning_seconds: float = 0.0
) -> CostEstimate:
    """The re-renders of `images` images, scaled from the `keys` planned for the first `planned`
    images (those the memo lacks), priced by timing one small batch of them (render + forward),
    plus `planning_seconds` of measured work per image."""
    per_image = ctx.missing_features(keys) / max(1, planned)
    total = int(round(per_image * images))
    count = min(CALIBRATION_IMAGES, ctx.settings.batch_size, len(keys))
    seconds = spent = 0.0
    if count and total:
        make = renders(ctx)
        seconds, spent = seconds_per_image(lambda: ctx.features(make(keys[:count])), count, ctx.device)
    work = f"about {per_image:.1f} interventions per image (planned for the first {planned}) = {total:,} re-renders"
    passes = (PassCount(total, "forward", seconds),)
    return CostEstimate("funnybirds", images, work, passes, count, spent, planning_seconds)
