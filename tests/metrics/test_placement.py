"""Placement: peaks on / next to / away from part masks, leaders by class-specific contribution."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from protoquant.metrics import evaluate_metrics
from protoquant.metrics import placement as pl
from protoquant.metrics.run_placement import NEAR_PIXELS, TOP_COUNTS
from protoquant.metrics.settings import MetricSettings, scaled

SIZE = 32  # S of the hand-made examples
NEAR = 4.0  # next-to distance of the hand-made examples, in pixels
FUNNYBIRDS_ROOT = Path(os.environ.get("FUNNYBIRDS_ROOT", "/work/shared/funnybirds/FunnyBirds"))


def _square_mask() -> np.ndarray:
    """(1, S, S) one part: rows 10..13, cols 10..13."""
    masks = np.zeros((1, SIZE, SIZE), dtype=bool)
    masks[0, 10:14, 10:14] = True
    return masks


def _peak_map(row: int, col: int, grid: int = SIZE) -> torch.Tensor:
    """(1, grid, grid) map with a single maximum at (row, col)."""
    heat = torch.zeros(1, grid, grid)
    heat[0, row, col] = 1.0
    return heat


def test_peak_on_a_part_pixel_is_on_part() -> None:
    distance = pl.part_distance(_square_mask())
    peak = pl.peak_pixels(_peak_map(12, 11), SIZE)[0]
    assert tuple(peak) == (12, 11)
    assert distance[peak[0], peak[1]] == 0
    assert pl.classify(distance[peak[0], peak[1]], NEAR) == pl.ON_PART


def test_peak_just_outside_within_the_distance_is_next_to_part() -> None:
    distance = pl.part_distance(_square_mask())
    # (12, 16): three columns right of the last part column 13; (16, 16): diagonal, sqrt(3^2 + 3^2)
    assert distance[12, 16] == pytest.approx(3.0)
    assert distance[16, 16] == pytest.approx(math.hypot(3, 3))
    assert pl.classify(distance[12, 16], NEAR) == pl.NEXT_TO_PART
    assert pl.classify(distance[16, 16], NEAR) == pl.BACKGROUND  # 4.24 > 4
    assert pl.classify(distance[12, 17], NEAR) == pl.NEXT_TO_PART  # exactly 4: inclusive


def test_peak_far_away_is_background() -> None:
    distance = pl.part_distance(_square_mask())
    assert distance[30, 2] == pytest.approx(math.hypot(30 - 13, 10 - 2))
    assert pl.classify(distance[30, 2], NEAR) == pl.BACKGROUND


def test_no_part_pixel_makes_everything_background() -> None:
    distance = pl.part_distance(np.zeros((2, SIZE, SIZE), dtype=bool))
    assert np.isinf(distance).all()
    assert (pl.classify(distance, NEAR) == pl.BACKGROUND).all()


def test_area_places_count_every_pixel_once() -> None:
    distance = pl.part_distance(_square_mask())
    counts = pl.area_places(distance, NEAR)
    assert counts.sum() == SIZE * SIZE and counts[pl.ON_PART] == 16
    disc = sum(1 for y in range(SIZE) for x in range(SIZE) if 0 < distance[y, x] <= NEAR)
    assert counts[pl.NEXT_TO_PART] == disc


def test_upsampled_peak_lands_in_its_grid_cell() -> None:
    grid, cell = 4, SIZE // 4
    peaks = pl.peak_pixels(torch.cat([_peak_map(1, 2, grid), _peak_map(3, 0, grid)]), SIZE)
    for (row, col), (cell_row, cell_col) in zip(peaks, [(1, 2), (3, 0)]):
        assert row // cell == cell_row and col // cell == cell_col


def test_masks_to_input_resizes_whole_image_and_centre_crops() -> None:
    masks = np.zeros((1, 8, 16), dtype=bool)
    masks[0, :, :8] = True  # left half of a 16 x 8 image
    whole = pl.masks_to_input(masks, 4, 1.0)
    assert whole.shape == (1, 4, 4) and whole[0, :, :2].all() and not whole[0, :, 2:].any()
    cropped = pl.masks_to_input(masks, 4, 0.5)  # shorter side 8, width 16: the centre 4 x 4 of 16 x 8
    assert cropped.shape == (1, 4, 4) and cropped[0, :, :2].all() and not cropped[0, :, 2:].any()


def test_leaders_use_the_class_specific_part_of_the_weight() -> None:
    scores = torch.tensor([1.0, 1.0, 1.0])
    # prototype 0 has the largest weight for class 0, but every class gives it 5: agnostic
    weights = torch.tensor([[6.0, 3.0, 0.0], [5.0, 0.0, 2.0]])
    specific = pl.specific_contributions(scores, weights, 0)
    torch.testing.assert_close(specific, torch.tensor([1.0, 3.0, 0.0]))
    assert pl.leaders(specific, 5).tolist() == [1, 0]  # only positive ones, largest first


def test_shares_weighted_and_empty() -> None:
    places = np.array([pl.ON_PART, pl.BACKGROUND, pl.BACKGROUND])
    assert pl.shares(places) == pytest.approx({"on_part": 1 / 3, "next_to_part": 0.0, "background": 2 / 3})
    weighted = pl.shares(places, np.array([2.0, 1.0, 1.0]))
    assert weighted["on_part"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in pl.shares(np.zeros(0, np.int64)).values())


def _check_report(report: dict, num_images: int) -> None:
    value = report["placement"]
    for prefix in (*(f"top{n}" for n in TOP_COUNTS), "evidence", "chance"):
        total = sum(value[f"{prefix}_{name}"] for name in pl.PLACES)
        assert total == pytest.approx(1.0)
    assert value["num_images"] == num_images
    assert value["num_leaders"] <= max(TOP_COUNTS) * num_images
    rows = report["rows"]["placement"]
    assert len(rows) == value["num_leaders"]
    top1 = [r for r in rows if r["rank"] == 0]
    on = sum(r["place"] == "on_part" for r in top1) / len(top1)
    assert on == pytest.approx(value["top1_on_part"])
    assert all((r["distance_px"] == 0) == (r["place"] == "on_part") for r in rows)


def test_runner_on_the_synthetic_split(tiny_metrics_run) -> None:
    result = tiny_metrics_run
    report = evaluate_metrics(
        result.model,
        result.splits.test,
        "placement",
        settings=MetricSettings(),
        store=result.caches.test.store,
    )
    _check_report(report, len(result.splits.test))
    protocol = report["protocol"]["metrics"]["placement"]
    assert protocol["next_to_part_pixels"] == scaled(NEAR_PIXELS, 64)
    _check_leaders_by_brute_force(result, report["rows"]["placement"], protocol["next_to_part_pixels"])


def _check_leaders_by_brute_force(result, rows: list[dict], near: float, images: int = 3) -> None:
    """The leader of the first images, its peak and its place, recomputed without the metric's code."""
    store, model = result.caches.test.store, result.model
    entries = store.entries(first_view_only=True)[:images]
    with torch.no_grad():
        out = model.head(store.get(entries))
    weights = model.head.class_weights.detach()
    for row, index in enumerate(store.image_index[entries].tolist()):
        predicted = int(out.logits[row].argmax())
        specific = out.scores[row] * (weights[predicted] - weights.min(dim=0).values)
        leader = int(specific.argmax())
        record = next(r for r in rows if r["image"] == index and r["rank"] == 0)
        assert record["prototype"] == leader
        masks = pl.masks_to_input(result.splits.test.annotations(index).masks, 64)  # (P, 64, 64)
        ys, xs = np.nonzero(masks.any(axis=0))
        distance = np.sqrt((ys - record["peak_row"]) ** 2 + (xs - record["peak_col"]) ** 2).min()
        assert record["distance_px"] == pytest.approx(distance)
        expected = "on_part" if distance == 0 else "next_to_part" if distance <= near else "background"
        assert record["place"] == expected


@pytest.mark.skipif(not FUNNYBIRDS_ROOT.is_dir(), reason=f"FunnyBirds subset not found at {FUNNYBIRDS_ROOT}")
def test_funnybirds_part_maps_give_masks_on_the_input() -> None:
    from protoquant.data.funnybirds import FunnyBirds

    dataset = FunnyBirds(str(FUNNYBIRDS_ROOT), "test")
    masks = dataset.annotations(0).masks
    mapped = pl.masks_to_input(masks, 64, 1.0)
    assert mapped.shape == (len(masks), 64, 64) and mapped.any()
    counts = pl.area_places(pl.part_distance(mapped), NEAR)
    assert counts.sum() == 64 * 64 and counts[pl.ON_PART] > 0
