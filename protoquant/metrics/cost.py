"""What an expensive protocol will cost, stated before it starts.

Misalignment, FunnyBirds and stability run the backbone on changed images (attacks, re-renders,
noisy copies). Before each starts, its runner counts the work (images, attacks / interventions /
noisy copies, backbone passes) and times a short calibration: one batch of the very work it will
repeat (a forward+backward for the attack, a render + forward for an intervention): the fastest
of two timed calls after one untimed warm-up. Where each image also costs work outside the
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

CALIBRATION_IMAGES = 8  # changed images in the timed batch of stability and FunnyBirds, at most
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


def _synchronise(device: torch.device) -> None:
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
        _synchronise(device)
    best = float("inf")
    for _ in range(max(1, repeats)):
        timed = time.perf_counter()
        work()
        _synchronise(device)
        best = min(best, time.perf_counter() - timed)
    return best / max(1, images), time.perf_counter() - start


def announce(estimate: CostEstimate) -> str:
    """Log the estimate at INFO and return the short text the progress bar shows."""
    logger.info("%s", estimate.describe())
    return f"about {format_seconds(estimate.estimated_seconds)}"
