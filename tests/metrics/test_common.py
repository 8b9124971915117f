"""Shared rules: prototypes of a class, part grouping, keypoint mapping as the reference code."""

import numpy as np
import torch

from protoquant.metrics.common import class_prototypes, keypoints_to_input, part_groups


def test_top_k_by_weight_positive_only_ties_to_lower_index():
    weights = torch.tensor([[0.5, 0.9, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    slots = class_prototypes(weights, 2)
    assert slots.classes.tolist() == [0, 0, 2, 2]  # class 1 has no positive weight: no slots
    assert slots.prototypes.tolist() == [1, 0, 3, 2]  # tie 0.5 between 0 and 2 -> 0
    assert slots.of_class(2).tolist() == [2, 3] and "top-2" in slots.rule


def test_part_groups_cub_and_funnybirds_names():
    cub = ("back", "left eye", "left leg", "right eye", "right leg")
    names, group_of = part_groups(cub, merge_left_right=True)
    assert names == ("back", "eye", "leg") and group_of.tolist() == [0, 1, 2, 1, 2]
    names, group_of = part_groups(cub, merge_left_right=False)
    assert len(names) == 5
    names, group_of = part_groups(("beak", "eye01", "eye02", "foot01"), merge_left_right=False)
    assert names == ("beak", "eye", "foot") and group_of.tolist() == [0, 1, 1, 2]


def test_keypoints_truncate_like_the_reference():
    # CUB: crop (x1, x2) = (10, 110); part at x = 59.9 in the original -> 49.9 in the crop.
    # reference: int(224 * ((int(59.9) - 10) / (110 - 10))) = int(109.76) = 109
    mapped = keypoints_to_input(np.array([[49.9, 0.0]], np.float32), (100, 50), 224)
    assert mapped.tolist() == [[109, 0]]
    assert keypoints_to_input(np.array([[99.99, 49.99]]), (100, 50), 224).tolist() == [[221, 219]]
    # centre crop: 200 x 100 image, S = 100, ratio 0.5 -> short side 200, resized 400 x 200, offset (150, 50)
    assert keypoints_to_input(np.array([[100.0, 50.0]]), (200, 100), 100, 0.5).tolist() == [[50, 50]]


def test_keypoints_at_the_image_border_divide_before_scaling():
    # x = W = 191: int(224 * (191 / 191)) = 224, while int(191 * (224 / 191)) = int(223.99999...) = 223.
    # y = 37 of H = 111: int(224 * (37 / 111)) = int(74.666...) = 74 either way.
    assert keypoints_to_input(np.array([[191.0, 37.0]]), (191, 111), 224).tolist() == [[224, 74]]
    # the bottom-right corner of a 7 x 3 crop (x = 7.6 truncates to 7 = W, y = 3 = H) maps to (224, 224)
    assert keypoints_to_input(np.array([[7.6, 3.0]]), (7, 3), 224).tolist() == [[224, 224]]
