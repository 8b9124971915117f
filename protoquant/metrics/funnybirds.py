"""FunnyBirds protocols (Hesse et al., ICCV 2023) for part-prototype explanations.

Attribution for class c = sum_p w[c, p] * upsample(similarity_p). A part's importance is the
attribution inside its mask after a 5 x 5 max-pool dilation (instances of one part, e.g. two eyes,
dilated separately and summed); it is important at threshold t iff importance > t * total
attribution (strict). Interventions (re-renders without parts or background objects) give the
model-side checks. Scores per threshold are combined at t* = first argmax of (CSDC+PC+DC)/3 + D.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from protoquant.metrics.common import part_groups
from protoquant.metrics.settings import FB_DILATION, FB_LOGIT_FRACTION, FB_TS_DISTANCE


def slots_of_parts(part_names: Sequence[str], slots: Sequence[str]) -> np.ndarray:
    """(P,) slot index of every annotated part, matched by name as the reference does.

    Digits are stripped from the part names ("eye01" -> "eye"), whatever order the masks come in;
    e.g. FunnyBirds' masks (eye01, eye02, beak, ...) against its slots (beak, eye, foot, tail, wing)
    give [1, 1, 0, ...]. A part whose name is no slot raises a ValueError naming both.
    """
    names, group_of = part_groups(tuple(part_names), merge_left_right=False)
    missing = [n for n in names if n not in slots]
    if missing:
        raise ValueError(f"FunnyBirds: annotated part(s) {missing} match no part slot of {list(slots)}")
    return np.asarray([list(slots).index(names[g]) for g in group_of], dtype=np.int64)


def dilate(masks: torch.Tensor, size: int = FB_DILATION) -> torch.Tensor:
    """(M, H, W) bool masks -> (M, H, W) float, dilated by a size x size max-pool (stride 1)."""
    pooled = F.max_pool2d(masks.float()[:, None], size, stride=1, padding=size // 2)
    return pooled[:, 0]


def region_importance(
    attribution: torch.Tensor, masks: torch.Tensor, group_of: np.ndarray, num_groups: int
) -> np.ndarray:
    """Attribution inside each dilated mask, summed per group.

    Args:
        attribution: (H, W). masks: (M, H, W) bool, one per part instance or background object.
        group_of: (M,) group (part or background object) of each mask.

    Returns:
        (G,) float64 importance.
    """
    per_mask = (dilate(masks) * attribution[None]).flatten(1).sum(dim=1).double().numpy()  # (M,)
    out = np.zeros(num_groups)
    np.add.at(out, group_of, per_mask)
    return out


def important(importance: np.ndarray, total: float, thresholds: np.ndarray) -> np.ndarray:
    """(T, G) bool: importance > t * total attribution, strictly, for every threshold t."""
    return importance[None, :] > thresholds[:, None] * total


def csdc(important_parts: np.ndarray, minimal_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """Controlled synthetic data check per threshold: max_S |S & important| / |S|.

    Args:
        important_parts: (T, G) bool over the bird parts. minimal_sets: the class's minimal
            sufficient part sets (group indices).

    Returns:
        (T,) float; 0 when the class has no minimal set.
    """
    best = np.zeros(len(important_parts))
    for part_set in minimal_sets:
        if len(part_set):
            best = np.maximum(best, important_parts[:, list(part_set)].sum(axis=1) / len(part_set))
    return best


def irrelevant(original: float, removed: np.ndarray, fraction: float = FB_LOGIT_FRACTION) -> np.ndarray:
    """(R,) bool: single removals that change the target logit by < 5 % or increase it."""
    diff = original - removed
    return (np.abs(diff) < abs(original * fraction)) | (original < removed)


def background_relevant(
    original: float, removed: np.ndarray, fraction: float = FB_LOGIT_FRACTION
) -> np.ndarray:
    """(M,) bool: background removals that lower the target logit by >= 5 %."""
    diff = original - removed
    return (np.abs(diff) >= abs(original * fraction)) & (original > removed)


def distractibility_terms(important_regions: np.ndarray, irrelevant_regions: np.ndarray) -> np.ndarray | None:
    """(T,) |important & irrelevant| / |irrelevant| per threshold; None when nothing is irrelevant.

    Args:
        important_regions: (T, R) bool over parts and background objects. irrelevant_regions: (R,).
    """
    count = int(irrelevant_regions.sum())
    if count == 0:
        return None
    return (important_regions & irrelevant_regions[None]).sum(axis=1) / count


def single_deletion(drops: np.ndarray, importance: np.ndarray) -> float:
    """0.5 * Spearman(logit drop, part importance) + 0.5; NaN when undefined (e.g. constant)."""
    if np.ptp(drops) == 0 or np.ptp(importance) == 0:
        return float("nan")
    return float(0.5 * stats.spearmanr(drops, importance).statistic + 0.5)


def ts_classes(class_parts: np.ndarray, target: int, distance: int = FB_TS_DISTANCE) -> tuple | None:
    """Two classes `distance` parts away from the target whose overlaps with it are disjoint.

    Args:
        class_parts: (C, P) variant of each part for every class.

    Returns:
        (class1, class2, overlap1, overlap2) as in the reference (first pair in class order), or None.
    """
    differ = (class_parts != class_parts[target]).sum(axis=1)  # (C,)
    candidates = np.flatnonzero(differ == distance)
    for first, second in itertools.combinations(candidates.tolist(), 2):
        overlap1 = np.flatnonzero(class_parts[first] == class_parts[target])
        overlap2 = np.flatnonzero(class_parts[second] == class_parts[target])
        if not set(overlap1) & set(overlap2):
            return first, second, overlap1, overlap2
    return None


def ts_assumption(
    original: np.ndarray, without1: np.ndarray, without2: np.ndarray, class1: int, class2: int
) -> bool:
    """Whether removing each class's overlap lowers that class's logit more than the other's.

    Args:
        original, without1, without2: (C,) logits of the image, without overlap 1, without overlap 2.
    """
    drop11, drop12 = without1[class1] - original[class1], without2[class1] - original[class1]
    drop21, drop22 = without1[class2] - original[class2], without2[class2] - original[class2]
    return bool(drop11 < drop12 and drop22 < drop21)


def ts_checks(
    importance1: np.ndarray, importance2: np.ndarray, overlap1: np.ndarray, overlap2: np.ndarray
) -> tuple[float, float]:
    """Each overlap more important for its own class (strict): two 0/1 scores.

    Args:
        importance1, importance2: (G,) part importance under class 1's and class 2's attribution.
    """
    first = float(importance1[overlap1].sum() > importance2[overlap1].sum())
    second = float(importance1[overlap2].sum() < importance2[overlap2].sum())
    return first, second


@dataclass(frozen=True)
class FunnyBirdsScores:
    accuracy: float
    csdc: float  # at t*
    pc: float
    dc: float
    d: float
    bi: float
    sd: float
    ts: float
    completeness: float  # Com = ((CSDC + PC + DC) / 3 + D) / 2
    correctness: float  # Cor = SD
    contrastivity: float  # Con = TS
    headline: float  # mean(Com, Cor, Con)
    threshold: float  # t*
    threshold_index: int


def best_threshold(csdc_t: np.ndarray, pc_t: np.ndarray, dc_t: np.ndarray, d_t: np.ndarray) -> int:
    """First argmax over thresholds of (CSDC + PC + DC) / 3 + D (ties: the lower threshold)."""
    objective = (csdc_t + pc_t + dc_t) / 3 + d_t
    return int(np.argmax(objective))


def combine(
    per_threshold: dict[str, np.ndarray], scalars: dict[str, float], thresholds: np.ndarray
) -> FunnyBirdsScores:
    """Scores at t* and the aggregates; per_threshold holds (T,) csdc, pc, dc, d."""
    index = best_threshold(*(per_threshold[k] for k in ("csdc", "pc", "dc", "d")))
    at = {k: float(v[index]) for k, v in per_threshold.items()}
    completeness = ((at["csdc"] + at["pc"] + at["dc"]) / 3 + at["d"]) / 2
    headline = float(np.mean([completeness, scalars["sd"], scalars["ts"]]))
    return FunnyBirdsScores(
        accuracy=scalars["accuracy"],
        csdc=at["csdc"],
        pc=at["pc"],
        dc=at["dc"],
        d=at["d"],
        bi=scalars["bi"],
        sd=scalars["sd"],
        ts=scalars["ts"],
        completeness=completeness,
        correctness=scalars["sd"],
        contrastivity=scalars["ts"],
        headline=headline,
        threshold=float(thresholds[index]),
        threshold_index=index,
    )


@dataclass
class Tally:
    """Per-image results of the FunnyBirds protocols, gathered by the runner."""

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
    full_renders: int = 0  # images whose "nothing removed" is the all-parts re-render


def finish(tally: Tally, thresholds: np.ndarray) -> tuple[FunnyBirdsScores, dict]:
    """Scores at t* and the aggregates, plus the per-threshold curves and counts."""

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
        "full_render_images": tally.full_renders,
    }
    return combine(per_threshold, scalars, thresholds), {"per_threshold": per_threshold, "counts": counts}
