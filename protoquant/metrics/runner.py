"""`evaluate_metrics`: run named metrics on a model and a dataset split, time each, record the protocol."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from protoquant import progress
from protoquant.cache.build import FeatureStore
from protoquant.cache.split import split_store
from protoquant.cache.view import CacheView
from protoquant.data.base import ImageDataset, SubsetDataset
from protoquant.metrics.common import class_prototypes
from protoquant.metrics.context import EvalContext, FeatureMemo
from protoquant.metrics.cost import format_seconds
from protoquant.metrics.registry import METRICS
from protoquant.metrics.result import jsonable
from protoquant.metrics.settings import REFERENCE_SIZE, MetricSettings
from protoquant.model import ProtoQuant

logger = logging.getLogger(__name__)

# The numbers `format_table` shows for each metric (the JSON holds everything).
HEADLINE_FIELDS = {
    "size": ("global_size", "local_size", "sparsity", "per_class_size"),
    "consistency": ("score", "num_consistent", "num_slots"),
    "stability": ("score", "score_abs_change", "argmax_cell_unchanged"),
    "purity": ("top_k", "all_above"),
    "misalignment": ("pac", "prc", "plc", "ac", "num_images"),
    "funnybirds": (
        "accuracy",
        "csdc",
        "pc",
        "dc",
        "d",
        "bi",
        "sd",
        "ts",
        "completeness",
        "headline",
        "threshold",
    ),
    "grounding": (
        "mean_cosine_used",
        "min_cosine_used",
        "mean_cosine_explaining",
        "num_used",
        "num_dead",
        "num_duplicates",
    ),
}


def resolve_metrics(names: str | Sequence[str]) -> list[str]:
    """A comma list, a sequence of names or "all" -> registry names, in order; unknown names raise."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid: all, {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def _crop_mode(model: ProtoQuant, dataset: ImageDataset) -> str:
    base = dataset
    while isinstance(base, SubsetDataset):
        base = base.parent
    crop = getattr(base, "crop", None)
    source = "box crop" if crop else ("uncropped" if crop is not None else "as loaded")
    ratio = model.config.backbone.crop_ratio
    resize = "resize to S x S" if ratio >= 1 else f"shorter side S / {ratio}, centre crop S"
    return f"{source}, {resize}"


def _protocol(model: ProtoQuant, dataset: ImageDataset, settings: MetricSettings) -> dict:
    size = model.config.backbone.image_size
    deviations = [] if size == REFERENCE_SIZE else [f"input size {size}: pixel lengths scaled from 224"]
    return {
        "seed": settings.seed,
        "image_size": size,
        "crop_mode": _crop_mode(model, dataset),
        "dataset": dataset.name,
        "split": dataset.split,
        "num_images": len(dataset),
        "head": type(model.head).__name__,
        "num_prototypes": model.head.num_prototypes,
        "prototype_rule": class_prototypes(
            model.head.class_weights.detach().cpu(), settings.prototypes_per_class
        ).rule,
        "backbone": model.backbone.info.name,
        "settings": asdict(settings),
        "deviations": deviations,
        "metrics": {},
    }


def _train_subset(
    model: ProtoQuant, train: CacheView | ImageDataset | None, device: torch.device
) -> CacheView | None:
    if train is None or isinstance(train, CacheView):
        return train
    store = split_store(model, train, device)
    return CacheView(store, store.entries(first_view_only=True))


def evaluate_metrics(
    model: ProtoQuant,
    dataset: ImageDataset,
    metrics: str | Sequence[str] = ("accuracy",),
    *,
    settings: MetricSettings | None = None,
    device: str | torch.device | None = None,
    store: FeatureStore | None = None,
    train: CacheView | ImageDataset | None = None,
    memo: FeatureMemo | None = None,
) -> dict:
    """Run `metrics` ("all", a comma list or names) on `dataset`; never modifies the model.

    Args:
        store: cached features of `dataset`, of which view 0 is read (when None: the training
            cache if it holds `dataset`, else a 1-view cache built with the model's transform).
        train: training split (dataset or cached CacheView of view-0 entries), needed by "grounding".
        memo: features of changed images, shared between heads on the same backbone (bounded,
            see `FeatureMemo`); None keeps none.

    Returns:
        {metric: value, ..., "protocol": {...}, "timing_seconds": {...}, "rows": {metric: [...]}}.
    """
    names = resolve_metrics(metrics)
    settings = settings or MetricSettings()
    device = torch.device(device) if device is not None else model.head.class_layer.weight.device
    start = time.perf_counter()
    store = store if store is not None else split_store(model, dataset, device)
    timing = {"feature_cache": time.perf_counter() - start}
    start = time.perf_counter()
    memo = memo if memo is not None else FeatureMemo(0)  # an empty memo is falsy: test for None
    ctx = EvalContext(model, dataset, settings, device, store, _train_subset(model, train, device), memo)
    timing["train_cache"] = time.perf_counter() - start
    report: dict = {"protocol": _protocol(model, dataset, settings), "rows": {}}
    bar = progress.bar(names, desc="metrics", unit="metric")
    for name in bar:
        bar.set_postfix(metric=name)  # the one running now
        start = time.perf_counter()
        result = METRICS[name](ctx)
        timing[name] = time.perf_counter() - start
        logger.info("metric %s: %.1fs", name, timing[name])
        report[name] = jsonable(result.value)
        report["protocol"]["metrics"][name] = jsonable(result.protocol)
        if result.rows:
            report["rows"][name] = jsonable(list(result.rows))
    report["timing_seconds"] = timing
    return report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and "mean" in value:
        return f"{_fmt(value['mean'])} ± {_fmt(value['std'])} ({value.get('num_pure', '?')} > 0.5)"
    return "n/a" if value is None else str(value)


def format_table(report: dict) -> str:
    """A two-column text table of each metric's headline numbers and its run time (and, for the
    expensive protocols, the time estimated before it started)."""
    lines = []
    for name in (n for n in METRICS if n in report):
        value = report[name]
        seconds = report.get("timing_seconds", {}).get(name)
        cost = report.get("protocol", {}).get("metrics", {}).get(name, {}).get("cost")
        estimated = f", estimated {format_seconds(cost['estimated_seconds'])}" if cost else ""
        suffix = f"  [{seconds:.1f} s{estimated}]" if seconds is not None else ""
        if not isinstance(value, dict):
            lines.append(f"  {name:<14} {_fmt(value)}{suffix}")
            continue
        fields = HEADLINE_FIELDS.get(name, tuple(value))
        text = ", ".join(f"{f} {_fmt(value.get(f))}" for f in fields if f in value)
        lines.append(f"  {name:<14} {text}{suffix}")
    return "\n".join(lines)
