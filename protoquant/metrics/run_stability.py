"""Runner of stability (Huang et al., ICCV 2023): consistency's part hits under input noise.

Clean features come from the cache; each image's noisy copy goes through the backbone once (in
batches of `batch_size`, unless a shared memo already holds it). Before it starts, the runner
counts the noisy copies and times the second batch of them after the first (load, noise, forward;
the run reuses both) and the scoring of a few images (head, part hits, score changes;
`protoquant.metrics.cost`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

import protoquant.metrics.consistency as cons
from protoquant.metrics.context import EvalContext
from protoquant.metrics.cost import (
    CALIBRATION_IMAGES,
    CostEstimate,
    PassCount,
    ReadyBatches,
    announce,
    first_batches,
    seconds_per_image,
)
from protoquant.metrics.maps import argmax_row_major
from protoquant.metrics.result import MetricResult
from protoquant.metrics.run_consistency import _image_hits, _protocol, _slots
from protoquant.metrics.sample import ImageSample, choose_images


def _noisy_images(ctx: EvalContext, indices: np.ndarray, noise: torch.Tensor):
    """`make_images` for the memo: keys (..., image) -> (n, 3, S, S) images plus their row of `noise`."""
    position = {int(i): row for row, i in enumerate(indices)}

    def make(keys: list[tuple]) -> torch.Tensor:
        wanted = [key[-1] for key in keys]
        images = ctx.preprocess([ctx.dataset.load_image(i) for i in wanted], np.asarray(wanted))
        return images + noise[[position[i] for i in wanted]]

    return make


def _draw_noise(ctx: EvalContext, count: int, generator: torch.Generator) -> torch.Tensor:
    settings, size = ctx.settings, ctx.image_size
    return cons.input_noise((count, 3, size, size), generator, settings.noise_std, settings.noise_clip)


def _tag(ctx: EvalContext, sample: ImageSample) -> tuple:
    """What the noise of an image depends on (it is drawn per batch of the sample)."""
    settings = ctx.settings
    return ("noise", settings.seed, settings.noise_std, settings.noise_clip, settings.batch_size) + (
        (sample.rule, len(sample.indices)) if sample.rule != "all" else ()
    )


def _keys(tag: tuple, indices: np.ndarray) -> list[tuple]:
    """Memo keys of the noisy copies of `indices`."""
    return [(*tag, int(i)) for i in indices]


def _noisy_features(
    ctx: EvalContext, indices: np.ndarray, generator: torch.Generator, tag: tuple
) -> torch.Tensor:
    """Features of the images plus seeded noise; the noise is drawn even when memoised (same stream)."""
    noise = _draw_noise(ctx, len(indices), generator)
    return ctx.memo_features(_keys(tag, indices), _noisy_images(ctx, indices, noise))


def _estimate(
    ctx: EvalContext, sample: ImageSample, tag: tuple, slots, with_parts: bool, generator: torch.Generator
) -> tuple[CostEstimate, ReadyBatches | None]:
    """The noisy copies still to featurise, priced by timing the run's second batch of them after
    its first (their noise drawn from the run's `generator`, their features handed to the run),
    plus the scoring of a few images (once, so that reading their annotations counts)."""
    missing = ctx.missing_features(_keys(tag, sample.indices))
    size = ctx.settings.batch_size
    if not len(sample.indices):
        return CostEstimate("stability", 0, "0 noisy copies", (PassCount(0, "forward", 0.0),), 0, 0.0), None
    batches = []
    for start in range(0, min(2 * size, len(sample.indices)), size):
        chosen = sample.indices[start : start + size]
        noise = _draw_noise(ctx, len(chosen), generator)  # in the run's order: the same stream
        batches.append((_keys(tag, chosen), _noisy_images(ctx, chosen, noise)))
    ready = first_batches(ctx, batches, later=missing)
    noisy = next(iter(ready.features.values()))[:CALIBRATION_IMAGES]  # of the first batch
    count = len(noisy)
    chosen = sample.indices[:count]
    entries = ctx.entries_of(chosen)

    def score() -> None:
        outputs = (ctx.head_output(ctx.store.get(entries).float()), ctx.head_output(noisy))
        for row, index in enumerate(chosen.tolist()):
            slot_ids = slots.of_class(int(ctx.labels[index]))
            if len(slot_ids):
                _stability_image(ctx, slots, slot_ids, index, (outputs, row), with_parts)

    scoring, spent_scoring = seconds_per_image(score, count, ctx.device, repeats=1, warm_up=False)
    work = f"{len(sample.indices):,} noisy copies ({len(sample.indices) - missing:,} already in the memo)"
    passes = (PassCount(missing, "forward", ready.seconds_each),)
    calibrated = max(ready.computed, count)
    spent = ready.spent + spent_scoring
    return CostEstimate("stability", len(sample.indices), work, passes, calibrated, spent, scoring), ready


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
    Runs on `stability_images` images (all when 0; else a recorded sample).
    """
    started, settings = time.perf_counter(), ctx.settings
    sample = choose_images(
        ctx.labels, settings.stability_images, seed=settings.seed, rule=settings.sample_rule
    )
    tag = _tag(ctx, sample)
    slots, with_parts = _slots(ctx), ctx.dataset.has_parts
    generator = torch.Generator().manual_seed(settings.seed)
    estimate, ready = _estimate(ctx, sample, tag, slots, with_parts, generator)
    same, seen = np.zeros(len(slots.classes)), np.zeros(len(slots.classes))
    score_change, cell_same = [], []
    desc = f"metrics: stability ({announce(estimate)})"
    for indices, clean in ctx.head_batches(ctx.entries_of(sample.indices), desc=desc):
        features = ready.take(_keys(tag, indices)) if ready else None  # made by the estimate
        if features is None:
            features = _noisy_features(ctx, indices, generator, tag)
        noisy = ctx.head_output(features)
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
        **_stability_protocol(ctx, slots, with_parts),
        "images": sample.describe(),
        "sample": sample.record(),
        "cost": estimate.record(time.perf_counter() - started),
    }
    return MetricResult(value, protocol)


def _stability_protocol(ctx: EvalContext, slots, with_parts: bool) -> dict:
    return {
        **_protocol(ctx, slots),
        "noise": f"N(0, {ctx.settings.noise_std}^2) clipped to +-{ctx.settings.noise_clip}, "
        "normalised input space, drawn per batch",
        "seed": ctx.settings.seed,
        "empty_class": "a slot whose class has no test images (or none in the sample) scores s_p = 0",
        "clean_features": "feature cache (float16); noisy features rounded to float16 as well",
        "extra": "score_abs_change / argmax_cell_unchanged: pooled scores and argmax latent cells "
        "of the same slots (grounding audit's noise check)",
        "parts": "all annotated parts" if with_parts else "none: the dataset has no parts, score not defined",
    }
