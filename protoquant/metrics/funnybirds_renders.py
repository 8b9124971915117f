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
from protoquant.metrics.cost import CostEstimate, PassCount, ReadyBatches, first_batches


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


def memo_keys(images: list, plans: list[dict]) -> list[tuple]:
    """Memo keys ("fb", index, parts, background) of the planned re-renders, in the run's order."""
    return [("fb", image.index, *key) for image, plan in zip(images, plans) for key in plan["keys"]]


def batches(images: list, plans: list[dict], size: int) -> list[list[tuple]]:
    """The memo keys of the re-renders of one chunk of images, in backbone batches of `size`."""
    wanted = memo_keys(images, plans)
    return [wanted[start : start + size] for start in range(0, len(wanted), size)]


def intervention_logits(
    ctx: EvalContext, images: list, plans: list[dict], ready: ReadyBatches | None = None
) -> dict:
    """{(index, parts, background): (C,) logits} of every planned re-render, `batch_size` at a time
    (a batch that `ready` holds takes its features)."""
    logits, make = {}, renders(ctx)
    for chunk in batches(images, plans, ctx.settings.batch_size):
        features = ready.take(chunk) if ready else None
        if features is None:
            features = ctx.memo_features(chunk, make)
        logits.update(
            zip([k[1:] for k in chunk], ctx.head_output(features).logits.double().numpy())
        )  # (R, C)
    return logits


def renders_estimate(
    ctx: EvalContext,
    images: int,
    keys: list[tuple],
    planned: int,
    planning_seconds: float,
    first: list[list[tuple]],
) -> tuple[CostEstimate, ReadyBatches | None]:
    """The re-renders of `images` images, scaled from the `keys` planned for the first `planned`
    images (those the memo lacks), priced by timing the run's second backbone batch after its
    first (`first`: the run's first batches, render + forward; their features handed to the run),
    plus `planning_seconds` of measured work per image."""
    per_image = ctx.missing_features(keys) / max(1, planned)
    total = int(round(per_image * images))
    make = renders(ctx)
    ready = first_batches(ctx, [(batch, make) for batch in first[:2]], later=total) if first else None
    work = f"about {per_image:.1f} interventions per image (planned for the first {planned}) = {total:,} re-renders"
    seconds, spent, count = (ready.seconds_each, ready.spent, ready.computed) if ready else (0.0, 0.0, 0)
    passes = (PassCount(total, "forward", seconds),)
    return CostEstimate("funnybirds", images, work, passes, count, spent, planning_seconds), ready
