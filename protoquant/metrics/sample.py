"""Which images an expensive protocol evaluates: all of them, or a recorded sample.

A sample is either the first n images (the FunnyBirds framework's `nr_itrs`) or a seeded,
class-stratified choice: each class gets a share of n proportional to its size (largest
remainder, ties to the lower class), its images drawn by a generator seeded with (seed, class).
The same (labels, n, seed) always give the same images, whatever else the run does, and the
indices come back sorted so batches read the split in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protoquant.errors import ConfigError

SAMPLE_RULES = ("stratified", "first")  # see the module docstring


@dataclass(frozen=True)
class ImageSample:
    """The images a protocol runs on, and how they were chosen (recorded in its output)."""

    indices: np.ndarray  # (n,) int64 image indices into the split, sorted
    rule: str  # "all", "first" or "stratified"
    seed: int
    of: int  # images in the split

    def describe(self) -> str:
        if self.rule == "all":
            return f"all {self.of} images"
        if self.rule == "first":
            return f"first {len(self.indices)} of {self.of} images"
        return f"seeded class-stratified sample of {len(self.indices)} of {self.of} images (seed {self.seed})"

    def record(self) -> dict:
        return {"rule": self.rule, "images": len(self.indices), "of": self.of, "seed": self.seed}


def _quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """(C,) images per class: proportional shares of `size`, largest remainder first (ties: lower class)."""
    exact = counts * size / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - quotas)))  # largest remainder, then lower class
    quotas[order[: size - int(quotas.sum())]] += 1
    return np.minimum(quotas, counts)


def choose_images(labels: np.ndarray, size: int, *, seed: int, rule: str = "stratified") -> ImageSample:
    """`size` images of a split with `labels` (N,): all when size is 0 or >= N, else by `rule`.

    Raises:
        ConfigError: `rule` is not one of SAMPLE_RULES, or `size` is negative.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if rule not in SAMPLE_RULES:
        raise ConfigError(f"metric setting 'sample_rule': expected one of {list(SAMPLE_RULES)}, got {rule!r}")
    if size < 0:
        raise ConfigError(f"a metric's image count must be >= 0 (0 = all images), got {size}")
    total = len(labels)
    if size == 0 or size >= total:
        return ImageSample(np.arange(total, dtype=np.int64), "all", seed, total)
    if rule == "first":
        return ImageSample(np.arange(size, dtype=np.int64), "first", seed, total)
    classes, counts = np.unique(labels, return_counts=True)
    chosen = []
    for c, quota in zip(classes.tolist(), _quotas(counts, size).tolist()):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng((seed, c))
        chosen.append(members[rng.permutation(len(members))[:quota]])
    return ImageSample(np.sort(np.concatenate(chosen)), "stratified", seed, total)
