"""The built-in demo: the whole pipeline on generated data, then one explanation figure."""

from __future__ import annotations

import logging
from pathlib import Path

from protoquant.config import CacheConfig, CodebookConfig, HeadConfig, RunConfig
from protoquant.explain import explain, training_patch
from protoquant.grounding import nearest_patches
from protoquant.pipeline import RunResult, run
from protoquant.render import render_explanation

logger = logging.getLogger(__name__)


def demo_config(out: str = "runs/demo") -> RunConfig:
    """Settings for the built-in data: a small codebook, tau and lr chosen on validation."""
    return RunConfig(
        out=out,
        cache=CacheConfig(root=str(Path(out) / "cache")),
        codebook=CodebookConfig(num_codes=256, epochs=10, kmeans_patches=50_000),
        head=HeadConfig(temperature_grid=(0.05, 0.1), lr_grid=(5e-2, 2e-1), epochs=100),
    )


def write_explanation_figure(result: RunResult, test_index: int = 0, top_prototypes: int = 4) -> Path:
    """Explain test image `test_index` and draw it with each prototype's nearest training patch."""
    model = result.model
    image = result.splits.test.load_image(test_index)
    explanation = explain(model, image, top_prototypes=top_prototypes)
    nearest = nearest_patches(model.head.codebook, result.caches.train_plain, 64, model.head.codebook.device)
    store = result.caches.train.store
    patches = {}
    for item in explanation.classes[0].prototypes:
        entry = int(nearest.entry[item.prototype])
        patches[item.prototype] = training_patch(
            result.splits.train,
            int(store.image_index[entry]),
            int(nearest.cell[item.prototype]),
            store.grid,
            model.transform,
            float(nearest.cosine[item.prototype]),
        )
    return render_explanation(explanation, result.out / "explanation.png", patches)


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
    rows = [
        (
            "data",
            f"{metrics['data']['dataset']}: {metrics['data']['train']} train / {metrics['data']['val']} val / {metrics['data']['test']} test, {metrics['data']['classes']} classes",
        ),
        ("linear probe (reference)", f"{100 * metrics['linear_probe']['test_accuracy']:.1f} % test accuracy"),
        (
            "stage 1: quantized",
            f"{100 * metrics['quantized']['test_accuracy']:.1f} % ({metrics['quantized']['used_codes']}/{metrics['quantized']['num_codes']} codes used)",
        ),
        (
            "stage 2: ProtoQuant",
            f"{100 * metrics['protoquant']['test_accuracy']:.1f} % (tau {metrics['protoquant']['temperature']}, {metrics['protoquant']['num_prototypes']} prototypes)",
        ),
        (
            "grounding",
            f"nearest-patch cosine {metrics['grounding']['mean_nearest_cosine_used']:.3f} mean over used codes",
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
    """Run the pipeline (demo settings unless `config` is given) and write `<out>/explanation.png`."""
    result = run(config or demo_config())
    figure = write_explanation_figure(result)
    logger.info("explanation figure: %s", figure)
    return result
