"""How compact the default explanations are, before and after the compact stage 2, on the built-in data.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/explanations.py

Trains ProtoQuant twice on the demo's cached features (frozen torchvision MobileNetV2, 10
synthetic classes; the cache folder runs/demo/cache is reused): "before" with the previous demo
settings (K = 256, tau from 0.05 / 0.1, every prototype weighted) and "after" with the current
defaults (`protoquant.demo.demo_config`), and "after" with `head.min_part_coverage` (background
prototypes left out of the top-k; the built-in data's part masks). The PIP-Net-style head (`protoquant.train.baseline`)
is fitted on the same cache, dense and then under the same sparsity (the same top-k limit and
fine-tuning). Every choice is made on the validation split; the table reports the test split:
accuracy, the mean share of the predicted class's class-specific logit carried by the 5 largest
contributions, the median local size and the global size. Results: runs/explanations/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import machine

from protoquant.config import HeadConfig, RunConfig
from protoquant.demo import demo_config
from protoquant.pipeline import Caches, explanation_summary, run
from protoquant.train.baseline import train_baseline_head
from protoquant.train.head import compute_scores, evaluate_head, limit_sparse

CPU = torch.device("cpu")
BEFORE_PROTOTYPES = 256  # the demo's codebook size before the compact default
BEFORE_TEMPERATURES = (0.05, 0.1)  # the demo's tau grid before the compact default
PART_COVERAGE = 0.1  # the option's row: background prototypes (< 10 % part pixels) never kept


def before_config(after: RunConfig, out: Path) -> RunConfig:
    """The previous demo settings: a larger codebook and a dense class layer."""
    return replace(
        after,
        out=str(out),
        codebook=replace(after.codebook, num_prototypes=BEFORE_PROTOTYPES),
        head=replace(after.head, temperature_grid=BEFORE_TEMPERATURES, top_k_per_class=0),
    )


def measured(head, caches: Caches, seconds: float, **extra) -> dict:
    batch = 64
    return {
        "test_accuracy": evaluate_head(head, caches.test, batch, CPU),
        **explanation_summary(head, caches.test, batch, CPU),
        "seconds": seconds,
        **extra,
    }


def baselines(caches: Caches, num_classes: int, config: HeadConfig, seed: int) -> dict[str, dict]:
    """The PIP-Net-style head, dense and limited to `config.top_k_per_class` with the same recipe."""
    start = time.perf_counter()
    dense_config = replace(config, top_k_per_class=0)
    head, selection = train_baseline_head(
        caches.train, caches.val, num_classes, dense_config, seed=seed, device=CPU
    )
    rows = {"PIP-Net-style head, dense": measured(head, caches, time.perf_counter() - start)}
    start = time.perf_counter()
    train = (compute_scores(head, caches.train, config.batch_size, CPU), caches.train.labels)
    val = (compute_scores(head, caches.val, config.batch_size, CPU), caches.val.labels)
    fit = dict(lr=selection["lr"], epochs=config.epochs, config=config, seed=seed)
    head.requires_grad_(True)
    limit_sparse(head.class_layer, config.top_k_per_class, train, val, config, fit)
    head.requires_grad_(False)
    name = f"PIP-Net-style head, top-{config.top_k_per_class}"
    rows[name] = measured(head, caches, time.perf_counter() - start)
    return rows


def markdown(rows: dict[str, dict], probe: float) -> str:
    lines = [
        "| model | test accuracy | linear probe | top-5 share of class-specific logit (mean) "
        "| local size (median) | global size | largest class |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {100 * row['test_accuracy']:.1f} % | {100 * probe:.1f} % "
            f"| {100 * row['top5_specific_share_mean']:.1f} % | {row['local_size_median']:.0f} "
            f"| {row['global_size']} | {row['per_class_max']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/explanations")
    parser.add_argument("--cache", default="runs/demo/cache", help="the demo's feature cache folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    after = demo_config(str(out / "after"))
    after = replace(after, device="cpu", cache=replace(after.cache, root=args.cache))
    on_parts = replace(
        after, out=str(out / "parts"), head=replace(after.head, min_part_coverage=PART_COVERAGE)
    )
    runs = (
        ("before (K 256, dense)", before_config(after, out / "before")),
        ("after (default)", after),
        (f"after, min_part_coverage {PART_COVERAGE:g}", on_parts),
    )
    rows, probe = {}, float("nan")
    for name, config in runs:
        start = time.perf_counter()
        result = run(config)
        probe = result.metrics["linear_probe"]["test_accuracy"]
        selection = {k: result.metrics["protoquant"][k] for k in ("temperature", "lr", "top_k_per_class")}
        head = result.model.head
        rows[f"ProtoQuant {name}"] = measured(head, result.caches, time.perf_counter() - start, **selection)
    rows.update(baselines(result.caches, len(result.model.classes), after.head, after.seed))
    seconds = ", ".join(f"{name} {row['seconds']:.0f} s" for name, row in rows.items())
    (out / "benchmark.json").write_text(json.dumps({"rows": rows, "probe_test_accuracy": probe}, indent=2))
    print(markdown(rows, probe))
    print(f"\n{machine()}\nseconds: {seconds}")


if __name__ == "__main__":
    main()
