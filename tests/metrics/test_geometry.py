"""Oracle maps on real synthetic annotations: a map that peaks on a part's cell must hit that part."""

import numpy as np
import torch

from protoquant.data.synthetic import SyntheticParts
from protoquant.metrics.common import keypoints_to_input
from protoquant.metrics.consistency import slot_hits
from protoquant.metrics.maps import argmax_column_major
from protoquant.metrics.purity import group_hits, patch_boxes

CELL = 32  # MobileNetV2 at 224 px: a 7 x 7 grid of 32 px cells


def oracle(keypoints: np.ndarray) -> torch.Tensor:
    """(P, 7, 7): prototype p peaks on the cell holding part p's centre."""
    activation = torch.zeros(len(keypoints), 7, 7)
    for p, (x, y) in enumerate(keypoints):
        activation[p, int(y // CELL), int(x // CELL)] = 1.0
    return activation


def test_oracle_maps_are_consistent_and_pure():
    data = SyntheticParts("test", num_classes=3, images_per_class=2, image_size=224)
    for index in range(len(data)):
        annotation = data.annotations(index)
        parts = len(annotation.part_names)
        activation = oracle(annotation.keypoints)
        keypoints = torch.from_numpy(keypoints_to_input(annotation.keypoints, (224, 224), 224))
        visible = torch.from_numpy(annotation.visible)
        hits = slot_hits(activation, torch.arange(parts), keypoints, visible, size=224)
        assert hits.diagonal().all()  # consistency's box around the upsampled argmax holds the part
        rows, cols = argmax_column_major(activation)
        boxes = patch_boxes(torch.stack([rows, cols], 1).numpy(), (7, 7), np.full((parts, 2), 224.0))
        repeat = (
            np.repeat(annotation.keypoints[None], parts, 0),
            np.repeat(annotation.visible[None], parts, 0),
        )
        patch_hits, _ = group_hits(boxes, *repeat, np.arange(parts), parts)
        assert patch_hits.diagonal().all()  # purity's patch at the argmax cell holds the part
