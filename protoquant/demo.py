"""The built-in demo: the whole pipeline on generated data, then the gallery, a figure and the HTML report."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from protoquant import distributed
from protoquant.backbones.stages import describe_scale
from protoquant.config import RunConfig
from protoquant.distributed import resolve_device
from protoquant.explain.explanation import build_report, explain
from protoquant.explain.gallery import build_gallery, save_gallery
from protoquant.explain.types import Gallery
from protoquant.pipeline import RunResult, run
from protoquant.presets import demo_config  # re-exported: the demo's settings
from protoquant.render import render_explanation, write_report

logger = logging.getLogger(__name__)

REPORT_IMAGES = 4  # test images the demo report explains (one per class, first classes first)
REPORT_DIR = "report"  # the report's folder inside the run's output folder


def demo_gallery(result: RunResult) -> Gallery:
    """Build the prototype gallery (with its pictures) from the run's training cache and images and
    store it in the checkpoint, so later explanations need no training data."""
    device = resolve_device(result.model.config.device)
    gallery = build_gallery(
        result.model, result.caches.train_plain, device=device, dataset=result.splits.train
    )
    save_gallery(gallery, result.out / "model")
    return gallery


def write_explanation_figure(
    result: RunResult, gallery: Gallery, test_index: int = 0, top_prototypes: int = 4
) -> Path:
    """Explain test image `test_index` and draw it with each prototype's nearest training patch and
    source image (from the gallery's stored pictures)."""
    image = result.splits.test.load_image(test_index)
    explanation = explain(result.model, image, top_prototypes=top_prototypes, gallery=gallery)
    return render_explanation(explanation, result.out / "explanation.png", gallery)


def report_images(result: RunResult, count: int = REPORT_IMAGES) -> list[tuple[str, Image.Image]]:
    """(name, image) of the first test image of each of the first `count` classes."""
    labels = result.splits.test.labels
    classes = result.splits.test.classes
    picked = [
        int((labels == c).nonzero()[0][0]) for c in range(min(count, len(classes))) if (labels == c).any()
    ]
    return [(f"test #{i} ({classes[labels[i]]})", result.splits.test.load_image(i)) for i in picked]


def write_demo_report(result: RunResult, gallery: Gallery) -> Path:
    """The HTML report for a few test images; returns the path of its index.html."""
    report = build_report(
        result.model,
        report_images(result),
        gallery,
        metrics=result.metrics,
        title="ProtoQuant demo: this looks like that",
    )
    return write_report(report, result.out / REPORT_DIR)


def _scale(backbone: dict) -> dict:
    """describe_scale's arguments from metrics.json's backbone block."""
    return {key: backbone[key] for key in ("grid", "stride", "receptive_field", "image_size")}


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = [
        (
            "data",
            f"{metrics['data']['dataset']}: {metrics['data']['train']} train / {metrics['data']['val']} val / {metrics['data']['test']} test, {metrics['data']['classes']} classes",
        ),
        ("backbone", f"{metrics['backbone']['name']}, " + describe_scale(**_scale(metrics["backbone"]))),
        ("linear probe (reference)", f"{100 * metrics['linear_probe']['test_accuracy']:.1f} % test accuracy"),
        (
            "stage 1: quantized",
            f"{100 * metrics['quantized']['test_accuracy']:.1f} % ({metrics['quantized']['used_prototypes']}/{metrics['quantized']['num_prototypes']} prototypes used)",
        ),
        (
            "stage 2: ProtoQuant",
            f"{100 * metrics['protoquant']['test_accuracy']:.1f} % (tau {metrics['protoquant']['temperature']}, {metrics['protoquant']['num_prototypes']} prototypes)",
        ),
        (
            "grounding",
            f"nearest-patch cosine {metrics['grounding']['mean_nearest_cosine_used']:.3f} mean over used prototypes",
        ),
        (
            "time",
            f"cache {metrics['timing']['cache_seconds']:.0f} s, train {metrics['timing']['train_seconds']:.0f} s",
        ),
    ]
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key.ljust(width)}  {value}" for key, value in rows)


def run_demo(config: RunConfig | None = None) -> RunResult:
    """Run the pipeline (demo settings unless `config` is given), store the prototype gallery in the
    checkpoint, and write `<out>/explanation.png` and the report `<out>/report/index.html`."""
    result = run(config or demo_config())
    if not distributed.context().is_main:  # under torchrun, rank 0 writes gallery, figure and report
        return result
    gallery = demo_gallery(result)
    figure = write_explanation_figure(result, gallery)
    report = write_demo_report(result, gallery)
    logger.info("explanation figure: %s, report: %s", figure, report)
    return result
