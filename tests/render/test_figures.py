"""PNG figures and tiles: drawn from explanation and gallery data; no model runs while drawing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from protoquant.render import render_class_sheet, render_explanation, render_overview
from protoquant.render.tiles import BOX_COLOUR, evidence_tile, heatmap_overlay, patch_tile


def _png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_local_explanation_figures(tiny_report, tmp_path, no_model):
    explanation = tiny_report.explanations[0][1]
    columns = len(explanation.predicted.prototypes) + 1
    plain = _png(render_explanation(explanation, tmp_path / "plain.png", class_rank=1))  # the runner-up
    with_patches = _png(render_explanation(explanation, tmp_path / "patches.png", tiny_report.patches))
    assert with_patches[1] > plain[1]  # a second row: the nearest training patches
    assert with_patches[0] == plain[0] >= 100 * columns


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
    blended = heatmap_overlay(image, heatmap).astype(int)
    assert blended.shape == image.shape
    change = np.abs(blended - 128).sum(axis=2)
    assert change[10, 20] == change.max() and change[10, 20] > change[0, 0]


def test_tiles_outline_the_box(tiny_report, no_model):
    explanation = tiny_report.explanations[0][1]
    item = explanation.predicted.prototypes[0]
    size = explanation.image.shape[0]
    tile = np.asarray(evidence_tile(explanation.image, item, size=size * 2))
    x1, y1, x2, y2 = item.box
    edge = tile[y1 * 2 : (y2 + 1) * 2, x1 * 2 + 2]  # a column just inside the box's left edge
    assert (np.abs(edge.astype(int) - BOX_COLOUR).sum(axis=1) == 0).any()
    patch = next(iter(tiny_report.patches.values()))
    assert max(patch_tile(patch, size=100).size) == 100
