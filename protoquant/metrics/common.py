"""Rules shared by several metrics: which prototypes belong to a class, parts, keypoint mapping."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PrototypeSlots:
    """The (class, prototype) pairs a class-specific protocol scores, S of them.

    ProtoQuant's prototypes are shared between classes, so "the prototypes of class c" is a rule
    (`rule`); a prototype shared by two classes fills two slots, each scored on its class's images.
    """

    classes: np.ndarray  # (S,) int64 class of each slot
    prototypes: np.ndarray  # (S,) int64 prototype of each slot
    rule: str

    def of_class(self, class_index: int) -> np.ndarray:
        """(s,) slot ids of class `class_index`."""
        return np.flatnonzero(self.classes == class_index)


def class_prototypes(class_weights: torch.Tensor, per_class: int) -> PrototypeSlots:
    """The top-`per_class` prototypes of every class by weight, strictly positive weights only.

    Args:
        class_weights: (C, K) effective non-negative class weights.
        per_class: prototypes per class (10 in Huang et al.).

    Returns:
        Slots ordered by class, then by decreasing weight; ties go to the lower prototype index.
    """
    weights = class_weights.detach().float().cpu()
    order = torch.sort(weights, dim=1, descending=True, stable=True).indices[:, :per_class]  # (C, k)
    classes, prototypes = [], []
    for c in range(weights.shape[0]):
        chosen = [int(p) for p in order[c] if weights[c, p] > 0]
        classes += [c] * len(chosen)
        prototypes += chosen
    rule = f"top-{per_class} prototypes by class weight w[c, p] > 0 (ties: lower index); shared prototypes"
    return PrototypeSlots(np.asarray(classes, np.int64), np.asarray(prototypes, np.int64), rule)


def part_groups(part_names: tuple[str, ...], *, merge_left_right: bool) -> tuple[tuple[str, ...], np.ndarray]:
    """Group parts whose names differ only by digits (and "left"/"right" when merging).

    Returns:
        group names (G,) in order of first appearance, and (P,) group index of every part.
        E.g. CUB's "left eye"/"right eye" -> "eye"; FunnyBirds' "eye01"/"eye02" -> "eye".
    """
    keys = []
    for name in part_names:
        key = re.sub(r"[\d_]+", " ", name.lower())
        if merge_left_right:
            key = re.sub(r"\b(left|right)\b", " ", key)
        keys.append(" ".join(key.split()) or name)
    groups = tuple(dict.fromkeys(keys))
    return groups, np.asarray([groups.index(k) for k in keys], dtype=np.int64)


def keypoints_to_input(
    keypoints: np.ndarray, image_wh: tuple[int, int], image_size: int, crop_ratio: float = 1.0
) -> np.ndarray:
    """Part centres in image pixels -> integer pixels of the model input, as the reference code.

    Keypoints are truncated to integers first, then divided by the side, scaled and truncated:
    x' = int(S * (int(x) / W)) (CUB: int(224 * ((int(x) - x1) / (x2 - x1))) on the box crop), in
    the reference's order of operations: x = W = 191 gives 224 (int(191 * (224 / 191)) gives 223).
    With crop_ratio < 1 the shorter side is resized to int(S / ratio) and the centre S x S kept.

    Args:
        keypoints: (P, 2) float (x, y). image_wh: (W, H) of the image they refer to.

    Returns:
        (P, 2) int64 (x, y) in the S x S input.
    """
    width, height = image_wh
    whole = np.floor(keypoints.astype(np.float64))  # int(x) for x >= 0 (keypoints are non-negative)
    if crop_ratio >= 1.0:
        return np.trunc(image_size * (whole / np.array([width, height]))).astype(np.int64)
    short = int(math.floor(image_size / crop_ratio))
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    offset = np.array([int(round((new_w - image_size) / 2.0)), int(round((new_h - image_size) / 2.0))])
    mapped = np.trunc(np.array([new_w, new_h]) * (whole / np.array([width, height]))).astype(np.int64)
    return mapped - offset
