"""The expensive protocols state their sample size and a measured time before they start."""

import logging
import math
from dataclasses import replace

import pytest

from protoquant.metrics import MetricSettings, evaluate_metrics, format_table
from protoquant.metrics.cost import CostEstimate, PassCount, format_seconds

FAST = MetricSettings(
    misalignment_images=3, attack_iterations=2, funnybirds_images=3, stability_images=4, batch_size=4
)
EXPENSIVE = ["misalignment", "stability", "funnybirds"]
KEYS = {
    "images",
    "work",
    "backbone_passes",
    "seconds_per_pass",
    "scoring_seconds_per_image",
    "calibration_images",
    "calibration_seconds",
    "estimated_seconds",
    "actual_seconds",
    "summary",
}


@pytest.fixture(scope="module")
def report(tiny_metrics_run):
    result = tiny_metrics_run
    logger = logging.getLogger("protoquant.metrics.cost")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        out = evaluate_metrics(
            result.model, result.splits.test, EXPENSIVE, settings=FAST, store=result.caches.test.store
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, [r.getMessage() for r in records]


def test_every_expensive_protocol_records_its_estimate_and_actual_seconds(report):
    out, _ = report
    for name in EXPENSIVE:
        cost = out["protocol"]["metrics"][name]["cost"]
        assert set(cost) == KEYS, name
        assert cost["summary"].startswith(f"{name}: ") and "backbone passes" in cost["summary"]
        assert "measured on" in cost["summary"]
        assert (
            cost["calibration_images"] >= 1 and cost["calibration_seconds"] >= 0
        )  # 0: the run's own batches
        assert all(s > 0 for s in cost["seconds_per_pass"].values())
        assert math.isfinite(cost["estimated_seconds"]) and cost["estimated_seconds"] > 0
        assert 0 < cost["actual_seconds"] <= out["timing_seconds"][name]
        expected = cost["images"] * cost["scoring_seconds_per_image"] + sum(
            cost["backbone_passes"][k] * cost["seconds_per_pass"][k] for k in cost["backbone_passes"]
        )
        assert cost["estimated_seconds"] == pytest.approx(expected)


def test_the_counts_are_the_work_that_was_done(report):
    out, _ = report
    protocols = out["protocol"]["metrics"]
    misalignment = protocols["misalignment"]["cost"]
    attacks = len(out["rows"]["misalignment"])
    assert misalignment["images"] == 3
    assert misalignment["backbone_passes"] == {
        "forward+backward": attacks * 2,
        "load+forward": 3,
        "forward": attacks,
    }
    assert misalignment["work"] == f"{attacks} attacks x 2 PGD steps"
    assert protocols["stability"]["cost"]["backbone_passes"] == {"forward": 4}  # one noisy copy per image
    funnybirds = protocols["funnybirds"]
    assert funnybirds["cost"]["images"] == 3 and funnybirds["interventions"] > 0
    assert funnybirds["cost"]["backbone_passes"]["forward"] > 0


def test_the_estimate_is_logged_before_the_protocol_runs(report):
    out, messages = report
    for name in EXPENSIVE:
        assert out["protocol"]["metrics"][name]["cost"]["summary"] in messages
    assert format_table(out).count("estimated") == len(EXPENSIVE)  # shown beside the actual seconds


def test_the_description_reads_as_the_work_and_its_price():
    estimate = CostEstimate(
        "misalignment",
        400,
        "400 attacks x 40 PGD steps",
        (PassCount(16_000, "forward+backward", 0.09), PassCount(800, "forward", 0.03)),
        8,
        1.5,
    )
    assert estimate.estimated_seconds == pytest.approx(16_000 * 0.09 + 800 * 0.03)
    assert estimate.describe() == (
        "misalignment: 400 images, 400 attacks x 40 PGD steps = 16,000 forward+backward + 800 forward "
        "backbone passes; about 24 min at 0.09 s per forward+backward, 0.03 s per forward (measured on 8 images)"
    )
    scored = replace(
        estimate, metric="stability", work="400 noisy copies", passes=(PassCount(400, "forward", 0.02),)
    )
    scored = replace(scored, scoring_seconds_each=0.01)
    assert scored.estimated_seconds == pytest.approx(400 * 0.02 + 400 * 0.01)
    assert scored.describe() == (
        "stability: 400 images, 400 noisy copies = 400 forward backbone passes + the work on 400 images; "
        "about 12 s at 0.02 s per forward, 0.01 s per image (measured on 8 images)"
    )
    assert [format_seconds(s) for s in (4.2, 40, 1380, 9000)] == ["4.2 s", "40 s", "23 min", "2.5 h"]


@pytest.mark.parametrize("random_start_only", [True, False])
def test_chunked_attack_rows_give_the_records_of_one_batch(tiny_metrics_run, random_start_only):
    result = tiny_metrics_run
    settings = replace(
        FAST, attack_target="class_each", misalignment_images=4, random_start_only=random_start_only
    )
    records = {
        rows: evaluate_metrics(
            result.model,
            result.splits.test,
            ["misalignment"],
            settings=replace(settings, attack_batch_size=rows),
            store=result.caches.test.store,
        )
        for rows in (1, 3, 1000)  # one row per PGD batch, uneven chunks, every row of a batch at once
    }
    reference = records[1000]["rows"]["misalignment"]
    assert len(reference) > settings.batch_size  # class_each makes several rows per image
    for rows in (1, 3):
        # the same records; floats to float tolerance (convolution kernels may sum in another
        # order for another batch shape, so bit equality holds on some CPUs only)
        chunked = records[rows]["rows"]["misalignment"]
        assert [r.keys() for r in chunked] == [r.keys() for r in reference]
        for got, want in zip(chunked, reference, strict=True):
            for key, value in want.items():
                expected = pytest.approx(value, rel=1e-4, abs=1e-5) if isinstance(value, float) else value
                assert got[key] == expected, (rows, key)
        assert records[rows]["protocol"]["metrics"]["misalignment"]["attack_rows_per_pass"] == rows


@pytest.mark.parametrize("images", [4, 10])  # one batch (timed itself); three (the second timed)
def test_the_timed_batches_are_the_runs_own(tiny_metrics_run, monkeypatch, images):
    from protoquant.metrics.context import EvalContext

    result, featurised = tiny_metrics_run, []
    real = EvalContext.features
    monkeypatch.setattr(EvalContext, "features", lambda ctx, x: featurised.append(len(x)) or real(ctx, x))
    settings = replace(FAST, stability_images=images, funnybirds_images=images)
    for name in ("stability", "funnybirds"):
        featurised.clear()
        out = evaluate_metrics(
            result.model, result.splits.test, [name], settings=settings, store=result.caches.test.store
        )
        cost = out["protocol"]["metrics"][name]["cost"]
        done = out["protocol"]["metrics"][name].get(
            "interventions", cost["images"]
        )  # stability: one per image
        assert sum(featurised) == done == cost["backbone_passes"]["forward"], name  # nothing extra
        assert max(featurised) <= FAST.batch_size and cost["seconds_per_pass"]["forward"] > 0


def test_misalignment_attacks_each_row_once(tiny_metrics_run, monkeypatch):
    import protoquant.metrics.misalignment as mis

    result, attacked = tiny_metrics_run, []
    real = mis.masked_pgd
    monkeypatch.setattr(
        mis,
        "masked_pgd",
        lambda fn, images, *a, **k: attacked.append(len(images)) or real(fn, images, *a, **k),
    )
    settings = replace(FAST, attack_target="class_each", misalignment_images=6, attack_batch_size=3)
    out = evaluate_metrics(
        result.model, result.splits.test, ["misalignment"], settings=settings, store=result.caches.test.store
    )
    rows = out["rows"]["misalignment"]
    assert (
        sum(attacked)
        == len(rows)
        == out["protocol"]["metrics"]["misalignment"]["cost"]["backbone_passes"]["forward"]
    )
    assert len(attacked) > 1  # the estimate's chunk, then the run's
