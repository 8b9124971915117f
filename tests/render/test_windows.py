"""One localisation rule for "this" and "that": the peak cell's window, the same size and zoom."""

from __future__ import annotations

import numpy as np
import pytest

from protoquant.explain.types import CROP_SIDE, cell_box, window, window_crop

GRIDS = ((2, 2), (7, 7), (14, 14), (4, 6))
SIZES = (64, 224, 225)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("size", SIZES)
def test_every_window_of_a_grid_has_one_size_and_holds_its_cell(grid, size):
    shapes = set()
    for row in range(grid[0]):
        for col in range(grid[1]):
            place = window((row, col), grid, size)
            x1, y1, x2, y2 = place.box
            assert 0 <= x1 <= x2 < size and 0 <= y1 <= y2 < size
            shapes.add((x2 - x1, y2 - y1))
            cx1, cy1, cx2, cy2 = place.cell
            assert (x1 + cx1, y1 + cy1, x1 + cx2, y1 + cy2) == cell_box((row, col), grid, size)
    assert len(shapes) == 1  # at the border the window shifts inwards instead of shrinking


def test_window_crop_cuts_the_window_at_one_zoom():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    for cell in ((0, 0), (3, 3), (6, 2)):
        crop, box = window_crop(image, cell, (7, 7))
        assert crop.shape == (CROP_SIDE, CROP_SIDE, 3)
        x1, y1, x2, y2 = box
        for side in (x2 - x1 + 1, y2 - y1 + 1):  # 1 cell of a 3-cell window, to a pixel of rounding
            assert abs(side - CROP_SIDE / 3) <= 1


def test_this_and_that_share_the_rule_and_scale(tiny_report):
    gallery = tiny_report.gallery
    for _, explanation in tiny_report.explanations:
        size = explanation.image.shape[0]
        for item in (p for c in explanation.classes for p in c.prototypes):
            assert item.box == cell_box(item.location, explanation.grid, size)
            this, this_cell = window_crop(explanation.image, item.location, explanation.grid)
            for ref in item.patches:
                that = gallery.patch(ref)
                assert that.crop.shape == this.shape  # the same window size at the same zoom
                (a1, b1, a2, b2), (c1, d1, c2, d2) = that.cell_box, this_cell
                assert abs((a2 - a1) - (c2 - c1)) <= 1 and abs((b2 - b1) - (d2 - d1)) <= 1  # one zoom
                assert ref.box == cell_box(ref.cell, gallery.grid, gallery.image_size)
