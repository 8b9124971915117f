"""Runner of the FunnyBirds protocols on any dataset that offers interventions.

A dataset qualifies when it (or the dataset a `SubsetDataset` wraps) implements
`render(index, remove_parts=..., remove_background=...)` (part = slot index), `background_masks(index)`
((M, H, W) bool) and `class_parts` ((C, G) variant per slot; minimal sufficient part sets are
computed from it, correctly for every class) or `minimal_sufficient_parts(class)`. The built-in
`SyntheticParts` and `FunnyBirds` do. Annotated parts are matched to slots by name (digits
stripped: "eye01"/"eye02" -> slot "eye"), as the reference does, so the mask order does not matter;
slots are the dataset's `part_slots` when it has them, else the part names in order. Where the
dataset has an all-parts re-render (`has_full_render`), "nothing removed" (PC with every part
important, DC with none) is scored on it, as the reference; otherwise on the original image.
Clean images are read from the feature cache; re-renders go through `ProtoQuant.features` (the
cache's own feature function) once per distinct removal set, `batch_size` at a time, and the
head turns each batch into logits at once, so memory is that of one batch (a shared memo keeps
features within its bound). Before the run, the interventions of the first images are planned
and the run's second batch of re-renders is timed after its first (both kept for the run;
`protoquant.metrics.cost`), giving the estimate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

import protoquant.metrics.funnybirds as fb
from protoquant import progress
from protoquant.data.base import ImageDataset
from protoquant.data.synthetic import minimal_sufficient_sets
from protoquant.metrics.common import part_groups
from protoquant.metrics.context import EvalContext
from protoquant.metrics.cost import CostEstimate, ReadyBatches, announce
from protoquant.metrics.funnybirds_renders import (
    base_dataset,
    batches,
    intervention_logits,
    memo_keys,
    renders_estimate,
)
from protoquant.metrics.maps import UPSAMPLING, quantile_box, upsample
from protoquant.metrics.result import MetricResult
from protoquant.metrics.sample import ImageSample, choose_images
from protoquant.metrics.settings import BOX_VARIANT_QUANTILE, FB_TS_DISTANCE, fb_thresholds

IMAGES_PER_CHUNK = 4  # images planned together (their interventions share backbone batches)
ESTIMATE_IMAGES = 16  # images planned ahead to count the interventions per image


def _check(dataset: ImageDataset, upsampling: str) -> ImageDataset:
    if upsampling not in UPSAMPLING:
        raise ValueError(f"funnybirds_upsampling must be one of {sorted(UPSAMPLING)}, got {upsampling!r}")
    base, _ = base_dataset(dataset, 0)
    missing = [name for name in ("render", "background_masks") if not hasattr(base, name)]
    if not hasattr(base, "class_parts") and not hasattr(base, "minimal_sufficient_parts"):
        missing.append("class_parts or minimal_sufficient_parts")
    if missing:
        raise ValueError(
            f"metric 'funnybirds' needs interventions; dataset {dataset.name} lacks {', '.join(missing)}"
        )
    return base


def minimal_sets(base: ImageDataset, class_index: int) -> list[tuple[int, ...]]:
    """Minimal sufficient part sets of a class, from `class_parts` when the dataset has it."""
    if hasattr(base, "class_parts"):
        return minimal_sufficient_sets(np.asarray(base.class_parts), class_index)
    return list(base.minimal_sufficient_parts(class_index))


@dataclass
class _Image:
    """One image's clean outputs, masks and cached importances."""

    index: int
    label: int
    logits: np.ndarray  # (C,)
    similarity: torch.Tensor  # (K, h, w)
    activation: torch.Tensor  # (K, h, w)
    scores: torch.Tensor  # (K,)
    masks: torch.Tensor  # (P, H, W) part instances
    group_of: np.ndarray  # (P,) slot of each part instance
    num_groups: int  # G slots
    background: torch.Tensor  # (M, H, W)
    full_render: bool = False  # "nothing removed" = the all-parts re-render (else the original)
    cache: dict = field(default_factory=dict)


def _attribution(ctx: EvalContext, image: _Image, c: int) -> torch.Tensor:
    """(H, W) attribution for class c: weighted maps ("similarity", "activation") or boxes ("box")."""
    weights = ctx.model.head.class_weights.detach().cpu()[c]  # (K,)
    size = tuple(image.masks.shape[-2:])
    mode, resize = ctx.settings.funnybirds_attribution, ctx.settings.funnybirds_upsampling
    if mode in ("similarity", "activation"):
        maps = image.similarity if mode == "similarity" else image.activation
        return upsample(torch.einsum("k,khw->hw", weights, maps), size, resize)  # upsampling is linear
    if mode != "box":
        raise ValueError(f"funnybirds_attribution must be 'similarity', 'activation' or 'box', got {mode!r}")
    out = torch.zeros(size)
    for k in torch.nonzero(weights > 0).flatten().tolist():
        y0, x0, y1, x1 = quantile_box(
            upsample(image.similarity[k], size, resize).numpy(), BOX_VARIANT_QUANTILE
        )
        out[y0 : y1 + 1, x0 : x1 + 1] += float(weights[k] * image.scores[k])
    return out


def _importance(ctx, image: _Image, c: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(parts (G,), background (M,), total attribution) for class c (cached per image)."""
    if c not in image.cache:
        attribution = _attribution(ctx, image, c)
        parts = fb.region_importance(attribution, image.masks, image.group_of, image.num_groups)
        count = len(image.background)
        background = fb.region_importance(attribution, image.background, np.arange(count), count)
        image.cache[c] = (parts, background, float(attribution.sum()))
    return image.cache[c]


def part_slots(base: ImageDataset, part_names: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """The dataset's slots (G,) and the slot (P,) of each annotated part, matched by name."""
    slots = getattr(base, "part_slots", None) or part_groups(part_names, merge_left_right=False)[0]
    return tuple(slots), fb.slots_of_parts(part_names, slots)


def _load(ctx: EvalContext, index: int, out, row: int) -> _Image:
    annotation = ctx.dataset.annotations(index)
    if annotation is None or annotation.masks is None:
        raise ValueError(f"metric 'funnybirds' needs part masks; {ctx.dataset.name} image {index} has none")
    base, base_index = base_dataset(ctx.dataset, index)
    slots, group_of = part_slots(base, annotation.part_names)
    return _Image(
        index=index,
        label=int(ctx.labels[index]),
        logits=out.logits[row].double().numpy(),
        similarity=out.similarity[row],
        activation=out.activation[row],
        scores=out.scores[row],
        masks=torch.from_numpy(np.asarray(annotation.masks, dtype=bool)),
        group_of=group_of,
        num_groups=len(slots),
        background=torch.from_numpy(np.asarray(base.background_masks(base_index), dtype=bool)),
        full_render=bool(getattr(base, "has_full_render", lambda _: False)(base_index)),
    )


def _plan(ctx: EvalContext, image: _Image, base, thresholds: np.ndarray) -> dict:
    """Removal sets this image needs: PC/DC sets per threshold, single removals, TS overlaps."""
    predicted = int(np.argmax(image.logits))
    parts, _, total = _importance(ctx, image, predicted)
    important = fb.important(parts, total, thresholds)  # (T, G)
    pair = fb.ts_classes(np.asarray(base.class_parts), image.label) if hasattr(base, "class_parts") else None
    plan = {
        "predicted": predicted,
        "important": important,
        "pc": [tuple(np.flatnonzero(~row).tolist()) for row in important],
        "dc": [tuple(np.flatnonzero(row).tolist()) for row in important],
        "singles": [(g,) for g in range(image.num_groups)],
        "pair": pair,
    }
    overlaps = [tuple(pair[2].tolist()), tuple(pair[3].tolist())] if pair else []
    part_sets = set(plan["pc"] + plan["dc"] + plan["singles"] + overlaps)
    if not image.full_render:
        part_sets.discard(())  # nothing removed: the original image's logits
    plan["keys"] = [(p, ()) for p in sorted(part_sets)] + [((), (m,)) for m in range(len(image.background))]
    return plan


def logits_after(image: _Image, logits: dict, parts: tuple = (), background: tuple = ()) -> np.ndarray:
    """(C,) logits of image without `parts` / `background`; nothing removed and no full re-render: clean."""
    key = (image.index, parts, background)
    if not parts and not background and key not in logits:
        return image.logits
    return logits[key]


def _chunk(ctx: EvalContext, entries: np.ndarray, base, thresholds, desc: str = "metrics: head outputs"):
    """Yield (images, plans) of the view-0 `entries`, one head batch at a time."""
    for indices, out in ctx.head_batches(entries, desc=desc):
        images = [_load(ctx, int(i), out, row) for row, i in enumerate(indices)]
        yield images, [_plan(ctx, image, base, thresholds) for image in images]


def _estimate(
    ctx: EvalContext, sample: ImageSample, entries: np.ndarray, base, thresholds
) -> tuple[CostEstimate, ReadyBatches | None, dict[int, tuple[list, list]]]:
    """Re-renders ahead: planned for the first `ESTIMATE_IMAGES` images and scaled to the sample;
    the run's second backbone batch timed after its first; the planning of those images (loading,
    attribution maps) is the per-image work. Returns the estimate, the featurised batches and the
    planned chunks ({first entry position: (images, plans)}), all kept for the run."""
    first, images, plans, started = entries[:ESTIMATE_IMAGES], [], [], time.perf_counter()
    for chunk_images, chunk_plans in _chunk(
        ctx, first, base, thresholds, desc="metrics: funnybirds planning"
    ):
        images, plans = images + chunk_images, plans + chunk_plans
    planning = (time.perf_counter() - started) / max(1, len(first))  # every image is planned so
    size, runs, planned = ctx.settings.batch_size, [], {}  # the run's backbone batches, chunk by chunk
    for start in range(0, len(images), IMAGES_PER_CHUNK):
        planned[start] = (images[start : start + IMAGES_PER_CHUNK], plans[start : start + IMAGES_PER_CHUNK])
        runs += batches(*planned[start], size)
    keys = memo_keys(images, plans)
    return (*renders_estimate(ctx, len(sample.indices), keys, len(first), planning, runs), planned)


def _score(
    ctx: EvalContext, image: _Image, plan: dict, logits: dict, tally: fb.Tally, base, thresholds
) -> None:
    y, predicted, fraction = image.label, plan["predicted"], ctx.settings.fb_logit_fraction

    def after(parts: tuple = (), background: tuple = ()) -> np.ndarray:
        return logits_after(image, logits, parts, background)

    tally.images += 1
    tally.full_renders += int(image.full_render)
    if predicted == y:
        tally.correct += 1
        tally.csdc.append(fb.csdc(plan["important"], minimal_sets(base, y)))
    tally.pc.append([float(after(s).argmax() == predicted) for s in plan["pc"]])
    tally.dc.append([float(after(s).argmax() != predicted) for s in plan["dc"]])
    parts, background, total = _importance(ctx, image, y)
    original = image.logits[y]
    removed_parts = np.array([after(s)[y] for s in plan["singles"]])
    removed_bg = np.array([after((), (m,))[y] for m in range(len(background))])
    regions = fb.important(np.concatenate([parts, background]), total, thresholds)
    terms = fb.distractibility_terms(
        regions, fb.irrelevant(original, np.concatenate([removed_parts, removed_bg]), fraction)
    )
    if terms is not None:
        tally.d.append(terms)
    tally.bg_relevant += int(fb.background_relevant(original, removed_bg, fraction).sum())
    tally.bg_total += len(removed_bg)
    sd = fb.single_deletion(original - removed_parts, parts)
    if not np.isnan(sd):
        tally.sd.append(sd)
    _target_sensitivity(ctx, image, plan["pair"], after, tally)


def _target_sensitivity(ctx, image: _Image, pair, after, tally: fb.Tally) -> None:
    if pair is None:
        tally.ts_no_pair += 1
        return
    class1, class2, overlap1, overlap2 = pair
    without1, without2 = after(tuple(overlap1.tolist())), after(tuple(overlap2.tolist()))
    if not fb.ts_assumption(image.logits, without1, without2, class1, class2):
        tally.ts_assumption_failed += 1
        return
    importance1, importance2 = _importance(ctx, image, class1)[0], _importance(ctx, image, class2)[0]
    tally.ts.extend(fb.ts_checks(importance1, importance2, overlap1, overlap2))


def run_funnybirds(ctx: EvalContext) -> MetricResult:
    """FunnyBirds accuracy, CSDC, PC, DC, D, BI, SD, TS, t* and aggregates on `funnybirds_images`
    images (all when 0; else a recorded sample)."""
    started, settings = time.perf_counter(), ctx.settings
    base = _check(ctx.dataset, settings.funnybirds_upsampling)
    thresholds = fb_thresholds()
    sample = choose_images(
        ctx.labels, settings.funnybirds_images, seed=settings.seed, rule=settings.sample_rule
    )
    entries = ctx.entries_of(sample.indices)
    estimate, ready, planned = _estimate(ctx, sample, entries, base, thresholds)
    tally, rendered = fb.Tally(), 0
    desc = f"metrics: funnybirds ({announce(estimate)})"
    for start in progress.bar(range(0, len(entries), IMAGES_PER_CHUNK), desc=desc, unit="chunk"):
        chunk = entries[start : start + IMAGES_PER_CHUNK]
        for images, plans in (
            [planned.pop(start)] if start in planned else _chunk(ctx, chunk, base, thresholds)
        ):
            logits = intervention_logits(ctx, images, plans, ready)
            rendered += len(logits)
            for image, plan in zip(images, plans):
                _score(ctx, image, plan, logits, tally, base, thresholds)
    scores, extra = fb.finish(tally, thresholds)
    resize = settings.funnybirds_upsampling
    protocol = {
        "attribution": settings.funnybirds_attribution,
        "attribution_rule": f"sum_p w[c, p] * {resize}({settings.funnybirds_attribution}_p) at the image's size"
        if settings.funnybirds_attribution != "box"
        else f"sum_p w[c, p] * score_p over the 95th-percentile box of {resize}(similarity_p)",
        "upsampling": UPSAMPLING[resize]
        + ("" if resize == "bilinear" else "; the framework's default is bilinear"),
        "part_matching": "annotated parts matched to the slots by name, digits stripped (as the reference)",
        "nothing_removed": f"all-parts re-render where the dataset has it ({tally.full_renders} of "
        f"{tally.images} images, as the reference), else the original image",
        "thresholds": f"linspace({thresholds[0]}, {thresholds[-1]}, {len(thresholds)}), important iff > t * total",
        "dilation": "5 x 5 max-pool per part instance and per background object",
        "classes": "CSDC true class on correct images; PC/DC predicted class; D, BI, SD, TS true class",
        "logit_fraction": settings.fb_logit_fraction,
        "minimal_sets": "computed from class_parts for every class (reference bug for the last class not copied)",
        "ts_distance": FB_TS_DISTANCE,
        "images": sample.describe(),
        "sample": sample.record(),
        "interventions": rendered,
        "cost": estimate.record(time.perf_counter() - started),
    }
    return MetricResult({**{k: getattr(scores, k) for k in scores.__dataclass_fields__}, **extra}, protocol)
