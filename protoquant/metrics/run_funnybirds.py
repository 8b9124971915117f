"""Runner of the FunnyBirds protocols on any dataset that offers interventions.

A dataset qualifies when it (or the dataset a `SubsetDataset` wraps) implements
`render(index, remove_parts=..., remove_background=...)` (part = group index of the annotation's
part names with digits stripped, e.g. "eye01"/"eye02" -> "eye"), `background_masks(index)`
((M, H, W) bool) and `class_parts` ((C, G) variant per part; minimal sufficient part sets are
computed from it, correctly for every class) or `minimal_sufficient_parts(class)`. The built-in
`SyntheticParts` does. Clean images are read from the feature cache; re-renders go through the
backbone once per distinct removal set and are memoised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from protoquant import progress
from protoquant.data.base import ImageDataset, SubsetDataset
from protoquant.data.synthetic import minimal_sufficient_sets
from protoquant.metrics import funnybirds as fb
from protoquant.metrics.common import part_groups
from protoquant.metrics.context import EvalContext
from protoquant.metrics.maps import quantile_box, resize_cubic
from protoquant.metrics.result import MetricResult
from protoquant.metrics.settings import BOX_VARIANT_QUANTILE, FB_TS_DISTANCE, fb_thresholds

IMAGES_PER_CHUNK = 4  # images whose interventions share one backbone pass


def _base(dataset: ImageDataset, index: int) -> tuple[ImageDataset, int]:
    while isinstance(dataset, SubsetDataset):
        dataset, index = dataset.parent, int(dataset.indices[index])
    return dataset, index


def _check(dataset: ImageDataset) -> ImageDataset:
    base, _ = _base(dataset, 0)
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
class _Tally:
    csdc: list = field(default_factory=list)
    pc: list = field(default_factory=list)
    dc: list = field(default_factory=list)
    d: list = field(default_factory=list)
    sd: list = field(default_factory=list)
    ts: list = field(default_factory=list)
    correct: int = 0
    images: int = 0
    bg_relevant: int = 0
    bg_total: int = 0
    ts_no_pair: int = 0
    ts_assumption_failed: int = 0


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
    group_of: np.ndarray  # (P,)
    num_groups: int
    background: torch.Tensor  # (M, H, W)
    cache: dict = field(default_factory=dict)


def _attribution(ctx: EvalContext, image: _Image, c: int) -> torch.Tensor:
    """(H, W) attribution for class c: weighted maps ("similarity", "activation") or boxes ("box")."""
    weights = ctx.model.head.class_weights.detach().cpu()[c]  # (K,)
    size = tuple(image.masks.shape[-2:])
    mode = ctx.settings.funnybirds_attribution
    if mode in ("similarity", "activation"):
        maps = image.similarity if mode == "similarity" else image.activation
        return resize_cubic(torch.einsum("k,khw->hw", weights, maps), size)  # upsampling is linear
    if mode != "box":
        raise ValueError(f"funnybirds_attribution must be 'similarity', 'activation' or 'box', got {mode!r}")
    out = torch.zeros(size)
    for k in torch.nonzero(weights > 0).flatten().tolist():
        y0, x0, y1, x1 = quantile_box(resize_cubic(image.similarity[k], size).numpy(), BOX_VARIANT_QUANTILE)
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


def _load(ctx: EvalContext, index: int, out, row: int) -> _Image:
    annotation = ctx.dataset.annotations(index)
    if annotation is None or annotation.masks is None:
        raise ValueError(f"metric 'funnybirds' needs part masks; {ctx.dataset.name} image {index} has none")
    names, group_of = part_groups(annotation.part_names, merge_left_right=False)
    base, base_index = _base(ctx.dataset, index)
    return _Image(
        index=index,
        label=int(ctx.labels[index]),
        logits=out.logits[row].double().numpy(),
        similarity=out.similarity[row],
        activation=out.activation[row],
        scores=out.scores[row],
        masks=torch.from_numpy(np.asarray(annotation.masks, dtype=bool)),
        group_of=group_of,
        num_groups=len(names),
        background=torch.from_numpy(np.asarray(base.background_masks(base_index), dtype=bool)),
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
    part_sets = set(plan["pc"] + plan["dc"] + plan["singles"] + overlaps) - {()}
    plan["keys"] = [(p, ()) for p in sorted(part_sets)] + [((), (m,)) for m in range(len(image.background))]
    return plan


def _logits(ctx: EvalContext, images: list[_Image], plans: list[dict]) -> dict:
    """{(index, parts, background): (C,) logits} of every planned re-render (memoised features)."""
    wanted = [(image.index, *key) for image, plan in zip(images, plans) for key in plan["keys"]]
    if not wanted:
        return {}

    def make(keys: list[tuple]) -> torch.Tensor:
        renders = []
        for *_, index, parts, background in keys:
            base, base_index = _base(ctx.dataset, index)
            renders.append(
                base.render(base_index, remove_parts=list(parts), remove_background=list(background))
            )
        return ctx.preprocess(renders, np.array([k[-3] for k in keys]))

    features = ctx.memo_features([("fb", *w) for w in wanted], make)
    logits = ctx.head_output(features).logits.double().numpy()  # (R, C)
    return dict(zip(wanted, logits))


def _score(
    ctx: EvalContext, image: _Image, plan: dict, logits: dict, tally: _Tally, base, thresholds
) -> None:
    y, predicted, fraction = image.label, plan["predicted"], ctx.settings.fb_logit_fraction

    def after(parts: tuple = (), background: tuple = ()) -> np.ndarray:
        return image.logits if not parts and not background else logits[(image.index, parts, background)]

    tally.images += 1
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


def _target_sensitivity(ctx, image: _Image, pair, after, tally: _Tally) -> None:
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


def _finish(tally: _Tally, thresholds: np.ndarray) -> tuple[fb.FunnyBirdsScores, dict]:
    def mean_rows(rows: list, default: float) -> np.ndarray:
        return np.mean(np.asarray(rows, float), axis=0) if rows else np.full(len(thresholds), default)

    def mean(values: list) -> float:
        return float(np.mean(values)) if values else float("nan")

    per_threshold = {
        "csdc": mean_rows(tally.csdc, 0.0),
        "pc": mean_rows(tally.pc, 0.0),
        "dc": mean_rows(tally.dc, 0.0),
        "d": 1.0 - mean_rows(tally.d, 0.0),  # no valid image: D = 1, as the reference
    }
    scalars = {
        "accuracy": tally.correct / tally.images if tally.images else float("nan"),
        "bi": 1.0 - tally.bg_relevant / tally.bg_total if tally.bg_total else float("nan"),
        "sd": mean(tally.sd),
        "ts": mean(tally.ts),
    }
    counts = {
        "images": tally.images,
        "correct": tally.correct,
        "d_images": len(tally.d),
        "sd_images": len(tally.sd),
        "ts_checks": len(tally.ts),
        "ts_no_pair": tally.ts_no_pair,
        "ts_assumption_failed": tally.ts_assumption_failed,
        "background_objects": tally.bg_total,
    }
    return fb.combine(per_threshold, scalars, thresholds), {"per_threshold": per_threshold, "counts": counts}


def run_funnybirds(ctx: EvalContext) -> MetricResult:
    """FunnyBirds accuracy, CSDC, PC, DC, D, BI, SD, TS, t* and aggregates on the first n images."""
    base = _check(ctx.dataset)
    thresholds = fb_thresholds()
    count = min(ctx.settings.funnybirds_images or len(ctx.dataset), len(ctx.dataset))
    entries = ctx.store.entries(first_view_only=True)[:count]
    tally = _Tally()
    for start in progress.bar(range(0, count, IMAGES_PER_CHUNK), desc="metrics: funnybirds", unit="chunk"):
        for indices, out in ctx.head_batches(entries[start : start + IMAGES_PER_CHUNK]):
            images = [_load(ctx, int(i), out, row) for row, i in enumerate(indices)]
            plans = [_plan(ctx, image, base, thresholds) for image in images]
            logits = _logits(ctx, images, plans)
            for image, plan in zip(images, plans):
                _score(ctx, image, plan, logits, tally, base, thresholds)
    scores, extra = _finish(tally, thresholds)
    protocol = {
        "attribution": ctx.settings.funnybirds_attribution,
        "attribution_rule": f"sum_p w[c, p] * bicubic({ctx.settings.funnybirds_attribution}_p) at the image's size"
        if ctx.settings.funnybirds_attribution != "box"
        else "sum_p w[c, p] * score_p over the 95th-percentile box of bicubic(similarity_p)",
        "thresholds": f"linspace({thresholds[0]}, {thresholds[-1]}, {len(thresholds)}), important iff > t * total",
        "dilation": "5 x 5 max-pool per part instance and per background object",
        "classes": "CSDC true class on correct images; PC/DC predicted class; D, BI, SD, TS true class",
        "logit_fraction": ctx.settings.fb_logit_fraction,
        "minimal_sets": "computed from class_parts for every class (reference bug for the last class not copied)",
        "ts_distance": FB_TS_DISTANCE,
        "images": f"first {count} of {len(ctx.dataset)}",
    }
    return MetricResult({**{k: getattr(scores, k) for k in scores.__dataclass_fields__}, **extra}, protocol)
