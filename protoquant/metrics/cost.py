"""What an expensive protocol will cost, stated as it starts.

Misalignment, FunnyBirds and stability run the backbone on changed images (attacks, re-renders,
noisy copies). Before each starts, its runner counts the work (images, attacks / interventions /
noisy copies, backbone passes) and times one batch of the very work it will repeat, at the
batch size the run uses (the cost per image depends on it: on 2 CPU cores MobileNetV2 takes
0.012 s per image in batches of 8 and 0.020 s in batches of 32 to 64), and on work of the run
itself, handed to the run, so measuring costs no extra pass. Misalignment times its first image
batch (loading, clean forward) and its first attack chunk (the whole PGD, whose steps spread the
backend's warm-up). Stability and FunnyBirds featurise the run's first two batches (noisy copies;
re-renders + forward), the first as the warm-up, the second timed (`first_batches`; a run of one
batch times that one, first-call costs included). Where each image also costs work outside the
backbone (stability scores part hits, FunnyBirds plans its interventions), that is timed once on
the calibration images, without a warm-up (it loads annotations the first time, as the run does).
The estimate is those counts times the measured seconds, never a constant; it is logged, shown on
the progress bar and recorded with the actual seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 8  # images of the warm-up, and of the timed scoring, of stability and FunnyBirds
TIMED_CALLS = 2  # timed calls after the warm-up; the fastest counts


@dataclass(frozen=True)
class PassCount:
    """`count` backbone passes of one kind, each taking `seconds_each` (measured per image)."""

    count: int
    kind: str  # "forward+backward" or "forward"
    seconds_each: float


@dataclass(frozen=True)
class CostEstimate:
    """The planned work of one protocol and its measured price."""

    metric: str
    images: int
    work: str  # e.g. "400 attacks x 40 PGD steps"
    passes: tuple[PassCount, ...]
    calibration_images: int
    calibration_seconds: float  # what measuring cost (warm-up included)
    scoring_seconds_each: float = 0.0  # per image, the measured work besides the backbone passes

    @property
    def estimated_seconds(self) -> float:
        passes = sum(p.count * p.seconds_each for p in self.passes)
        return float(passes + self.images * self.scoring_seconds_each)

    def describe(self) -> str:
        """E.g. "misalignment: 400 images, 400 attacks x 40 PGD steps = 16,000 backbone
        forward+backward passes; about 23 min at 0.09 s per pass (measured on 8 images)"."""
        counts = " + ".join(f"{p.count:,} {p.kind}" for p in self.passes)
        rates = ", ".join(f"{p.seconds_each:.3g} s per {p.kind}" for p in self.passes)
        if self.scoring_seconds_each:
            counts += f" backbone passes + the work on {self.images:,} images"
            rates += f", {self.scoring_seconds_each:.3g} s per image"
        else:
            counts += " backbone passes"
        return (
            f"{self.metric}: {self.images:,} images, {self.work} = {counts}; about "
            f"{format_seconds(self.estimated_seconds)} at {rates} (measured on {self.calibration_images} images)"
        )

    def record(self, actual_seconds: float | None = None) -> dict:
        """The estimate as plain values (for the protocol output), with the actual seconds when known."""
        return {
            "images": self.images,
            "work": self.work,
            "backbone_passes": {p.kind: p.count for p in self.passes},
            "seconds_per_pass": {p.kind: p.seconds_each for p in self.passes},
            "scoring_seconds_per_image": self.scoring_seconds_each,
            "calibration_images": self.calibration_images,
            "calibration_seconds": self.calibration_seconds,
            "estimated_seconds": self.estimated_seconds,
            "actual_seconds": actual_seconds,
            "summary": self.describe(),
        }


def format_seconds(seconds: float) -> str:
    """A duration a person reads at a glance: "40 s", "23 min", "2.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_image(
    work: Callable[[], object],
    images: int,
    device: torch.device,
    *,
    repeats: int = TIMED_CALLS,
    warm_up: bool = True,
) -> tuple[float, float]:
    """(seconds per image of `work`, seconds spent measuring): one warm-up call, then the fastest
    of `repeats` timed calls.

    `work` processes `images` images (a calibration batch); the warm-up keeps one-off costs
    (allocations, kernel selection) out of the measurement, the minimum the noise of a shared
    machine. Without `warm_up`, first-time costs that every image of the run pays (reading its
    annotations) stay in.
    """
    start = time.perf_counter()
    if warm_up:
        work()
        synchronise(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        timed = time.perf_counter()
        work()
        synchronise(device)
        best = min(best, time.perf_counter() - timed)
    return best / max(1, images), time.perf_counter() - start


def announce(estimate: CostEstimate) -> str:
    """Log the estimate at INFO and return the short text the progress bar shows."""
    logger.info("%s", estimate.describe())
    return f"about {format_seconds(estimate.estimated_seconds)}"


Batch = tuple[list[tuple], Callable[[list[tuple]], torch.Tensor]]  # memo keys, their `make_images`


@dataclass(frozen=True)
class ReadyBatches:
    """The run's first batches of changed images, featurised ahead and the last one timed."""

    features: dict[tuple, torch.Tensor]  # tuple(keys) -> (B, D, H, W) float32, as `memo_features` gives
    computed: int  # passes of the timed batch (those the memo lacked)
    seconds_each: float  # per timed pass; 0 when nothing was left to time
    spent: float  # seconds spent measuring beyond the run's own work

    def take(self, keys: list[tuple]) -> torch.Tensor | None:
        """The features of a batch with exactly these keys, once; None if it was not made ahead."""
        return self.features.pop(tuple(keys), None)


def first_batches(ctx, batches: list[Batch], *, later: int = 0) -> ReadyBatches:
    """Featurise the run's first `batches` through `ctx.memo_features`; the first of two is the
    warm-up (one-off costs: allocations at the batch's shape, kernel choice, first reads) and the
    last is timed. Their features go to the run, so measuring costs nothing extra.

    Where the memo already holds the timed batch and `later` passes are still to come, a batch of
    `CALIBRATION_IMAGES` of its images is timed instead (work done only to measure).
    """
    features: dict[tuple, torch.Tensor] = {}
    for keys, make in batches[:-1]:
        features[tuple(keys)] = ctx.memo_features(keys, make)
    keys, make = batches[-1]
    computed = ctx.missing_features(keys)
    synchronise(ctx.device)
    timed = time.perf_counter()
    features[tuple(keys)] = ctx.memo_features(keys, make)
    synchronise(ctx.device)
    if computed:
        return ReadyBatches(features, computed, (time.perf_counter() - timed) / computed, 0.0)
    if not later:
        return ReadyBatches(features, 0, 0.0, 0.0)
    count = min(CALIBRATION_IMAGES, len(keys))
    seconds, spent = seconds_per_image(lambda: ctx.features(make(keys[:count])), count, ctx.device)
    return ReadyBatches(features, count, seconds, spent)
