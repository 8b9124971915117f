"""PNG figures and tiles: drawn from explanation and gallery data; no model runs while drawing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from protoquant.render import render_class_sheet, render_explanation, render_overview
from protoquant.render.figures import explanation_figure, share_text
from protoquant.render.text import percent
from protoquant.render.tiles import BOX_COLOUR, evidence_tile, heatmap_overlay, patch_tile


def _png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_local_explanation_figures(tiny_report, tmp_path, no_model):
    explanation = tiny_report.explanations[0][1]
    columns = len(explanation.predicted.prototypes) + 1
    plain = _png(render_explanation(explanation, tmp_path / "plain.png", class_rank=1))  # the runner-up
    with_patches = _png(render_explanation(explanation, tmp_path / "patches.png", tiny_report.gallery))
    assert with_patches[1] > plain[1]  # more rows: the nearest training patches and source images
    assert with_patches[0] == plain[0] >= 100 * columns


def _colour_scales(fig) -> list[tuple[float, float]]:
    """(low, high) of every colour bar of a figure (matplotlib labels colour-bar axes "<colorbar>")."""
    return [tuple(float(v) for v in ax.get_ylim()) for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_one_colour_scale_per_figure_with_a_colour_bar(tiny_report, no_model):
    explanation, gallery = tiny_report.explanations[0][1], tiny_report.gallery
    fig = explanation_figure(explanation, gallery)
    assert _colour_scales(fig) == [pytest.approx(gallery.cosine_range)]  # one bar, on the gallery's scale
    plain = explanation_figure(explanation)  # without a gallery: the range of the figure's own maps
    maps = [item.similarity for c in explanation.classes for item in c.prototypes]
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    assert _colour_scales(plain) == [pytest.approx((low, high))]


def test_figure_states_the_shares_of_the_dataclass(tiny_report, no_model):
    for _, explanation in tiny_report.explanations:
        for rank, shown in enumerate(explanation.classes):
            title = explanation_figure(explanation, class_rank=rank).get_suptitle()
            assert title == share_text(shown)
            assert (
                f"{percent(shown.shown_share)} of the class-specific logit {shown.specific_logit:.2f}"
                in title
            )
            if shown.runner_up >= 0:
                assert f"{percent(shown.shown_margin_share)} of the margin {shown.margin:.2f}" in title
            assert "nan" not in title


def test_class_sheets_and_overview(tiny_report, tmp_path, no_model):
    gallery = tiny_report.gallery
    assert min(_png(render_class_sheet(gallery, 0, tiny_report.patches, tmp_path / "class-0.png"))) > 100
    assert min(_png(render_overview(gallery, tmp_path / "overview.png"))) > 100


def test_empty_class_and_empty_model_are_refused(tiny_report, tmp_path):
    empty = replace(tiny_report.gallery, class_weights=torch.zeros_like(tiny_report.gallery.class_weights))
    with pytest.raises(ValueError, match="weights no prototype"):
        render_class_sheet(empty, 0, tiny_report.patches, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no class weights"):
        render_overview(empty, tmp_path / "y.png")


def test_overlay_is_strongest_where_the_map_peaks():
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    heatmap = np.zeros((32, 32), dtype=np.float32)
    heatmap[10, 20] = 1.0
    blended = heatmap_overlay(image, heatmap, (0.0, 1.0)).astype(int)
    assert blended.shape == image.shape
    change = np.abs(blended - 128).sum(axis=2)
    assert change[10, 20] == change.max() and change[10, 20] > change[0, 0]


def test_a_value_has_one_colour_on_a_shared_scale():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    narrow = rng.uniform(0.4, 0.6, size=(16, 16)).astype(np.float32)
    wide = narrow.copy()
    wide[0, 0], wide[0, 1] = 0.0, 1.0  # other values in the map must not change anyone's colour
    scale = (0.0, 1.0)
    same = np.s_[1:, :]
    assert np.array_equal(
        heatmap_overlay(image, narrow, scale)[same], heatmap_overlay(image, wide, scale)[same]
    )


def test_tiles_outline_the_box(tiny_report, no_model):
    explanation = tiny_report.explanations[0][1]
    item = explanation.predicted.prototypes[0]
    size = explanation.image.shape[0]
    tile = np.asarray(evidence_tile(explanation.image, item, tiny_report.gallery.cosine_range, size=size * 2))
    x1, y1, x2, y2 = item.box
    edge = tile[y1 * 2 : (y2 + 1) * 2, x1 * 2 + 2]  # a column just inside the box's left edge
    assert (np.abs(edge.astype(int) - BOX_COLOUR).sum(axis=1) == 0).any()
    patch = next(iter(tiny_report.patches.values()))
    assert max(patch_tile(patch, size=100).size) == 100


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0])
def test_draw_box_handles_cells_smaller_than_its_outline(scale):
    """Fine grids (stride 8) drawn small give boxes a few pixels wide: drawing must not fail."""
    from PIL import Image

    from protoquant.render.tiles import draw_box

    image = Image.new("RGB", (16, 16))
    out = draw_box(image, (4, 4, 5, 5), scale)
    assert out.size == (16, 16) and out.getbbox() is not None  # something was drawn
