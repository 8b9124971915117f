"""Runner of placement: on-part / next-to-part / background shares of the leading prototypes.

Needs part masks (`PartAnnotations.masks`): the built-in synthetic data and FunnyBirds have them.
For every image of the split, the leaders of its predicted class are ranked by class-specific
contribution (`protoquant.metrics.placement`); the shares are reported for the leader (top 1), the
five leaders (each counted once) and for all prototypes with a positive class-specific
contribution weighted by it (the share of the class-specific logit whose peak lies there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import protoquant.metrics.placement as pl
from protoquant.metrics.context import EvalContext
from protoquant.metrics.result import MetricResult
from protoquant.metrics.settings import scaled

TOP_COUNTS = (1, 5)  # shares are reported for the leading 1 and 5 prototypes of each decision
# "next to a part": within this many pixels (at 224, scaled to S) of a part pixel: one cell of the
# default 7 x 7 grid, fixed in pixels so that models with finer grids are measured alike
NEAR_PIXELS = 32


@dataclass
class _Tally:
    leaders: dict[int, list] = field(default_factory=lambda: {n: [] for n in TOP_COUNTS})
    evidence_places: list = field(default_factory=list)
    evidence_weights: list = field(default_factory=list)
    area: np.ndarray = field(default_factory=lambda: np.zeros(len(pl.PLACES), np.int64))
    distances: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    images: int = 0


def near_pixels(ctx: EvalContext) -> float:
    """The next-to-part distance in input pixels: NEAR_PIXELS at 224, scaled to the input size."""
    return float(scaled(NEAR_PIXELS, ctx.image_size))


def _masks(ctx: EvalContext, index: int) -> np.ndarray:
    """(P, S, S) bool part masks of image `index` on the model input."""
    annotation = ctx.dataset.annotations(index)
    if annotation is None or annotation.masks is None:
        raise ValueError(f"metric 'placement' needs part masks; {ctx.dataset.name} image {index} has none")
    return pl.masks_to_input(annotation.masks, ctx.image_size, ctx.model.config.backbone.crop_ratio)


def _add_image(ctx: EvalContext, tally: _Tally, index: int, out, row: int, near: float) -> None:
    """Peaks and places of one image's positively contributing prototypes, into the tally."""
    weights = ctx.model.head.class_weights.detach().cpu().float()  # (C, K)
    predicted = int(out.logits[row].argmax())
    specific = pl.specific_contributions(out.scores[row].float(), weights, predicted)  # (K,)
    ranked = pl.leaders(specific, len(specific))  # every positive contribution, largest first
    peaks = pl.peak_pixels(out.activation[row][torch.from_numpy(ranked)], ctx.image_size)  # (n, 2)
    distance = pl.part_distance(_masks(ctx, index))  # (S, S)
    peak_distance = distance[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0)
    places = pl.classify(peak_distance, near)
    for count in TOP_COUNTS:
        tally.leaders[count].extend(places[:count].tolist())
    tally.evidence_places.extend(places.tolist())
    tally.evidence_weights.extend(specific[torch.from_numpy(ranked)].tolist())
    tally.area += pl.area_places(distance, near)
    tally.distances.extend(peak_distance[: max(TOP_COUNTS)].tolist())
    tally.images += 1
    for rank, k in enumerate(ranked[: max(TOP_COUNTS)].tolist()):
        tally.rows.append(
            {
                "image": index,
                "label": int(ctx.labels[index]),
                "predicted": predicted,
                "rank": rank,
                "prototype": k,
                "specific": float(specific[k]),
                "peak_row": int(peaks[rank, 0]),
                "peak_col": int(peaks[rank, 1]),
                "distance_px": float(peak_distance[rank]),
                "place": pl.PLACES[places[rank]],
            }
        )


def _flat(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in values.items()}


def _value(tally: _Tally) -> dict:
    value: dict = {}
    for count in TOP_COUNTS:
        value.update(_flat(f"top{count}", pl.shares(np.asarray(tally.leaders[count]))))
    value.update(
        _flat("evidence", pl.shares(np.asarray(tally.evidence_places), np.asarray(tally.evidence_weights)))
    )
    value.update(_flat("chance", pl.shares(np.arange(len(pl.PLACES)), tally.area)))
    finite = np.asarray(tally.distances, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    value["median_leader_distance_px"] = float(np.median(finite)) if len(finite) else float("nan")
    value["num_images"] = tally.images
    value["num_leaders"] = len(tally.leaders[max(TOP_COUNTS)])
    return value


def run_placement(ctx: EvalContext) -> MetricResult:
    """Shares of on-part / next-to-part / background peaks of each decision's leading prototypes."""
    near = near_pixels(ctx)
    tally = _Tally()
    for indices, out in ctx.head_batches():
        for row, index in enumerate(indices.tolist()):
            _add_image(ctx, tally, int(index), out, row, near)
    protocol = {
        "leaders": "predicted class; prototypes ranked by score_k * (w[c, k] - min_c' w[c', k]) > 0",
        "top_counts": list(TOP_COUNTS),
        "peak": "argmax pixel of the activation map, OpenCV-equivalent bicubic to S x S (ties: row-major)",
        "masks": "union of the part masks, nearest-neighbour at pixel centres onto the S x S input",
        "on_part": "peak pixel on a part mask",
        "next_to_part": f"not on a part, Euclidean distance <= {near:g} input px",
        "next_to_part_pixels": near,
        "next_to_part_pixels_at_224": NEAR_PIXELS,
        "next_to_part_cells": near * ctx.store.grid[1] / ctx.image_size,
        "grid": list(ctx.store.grid),
        "evidence": "all positive class-specific contributions, each weighted by it",
        "chance": "share of input pixels in each place: the level of a randomly placed peak",
    }
    return MetricResult(_value(tally), protocol, tuple(tally.rows))
