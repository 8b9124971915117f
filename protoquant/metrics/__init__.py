"""Interpretability metrics with the published protocols (see METRICS.md).

Each metric family is a module of pure functions over tensors (`size`, `consistency`, `purity`,
`misalignment`, `funnybirds`, `grounding`) plus a thin runner that feeds it a model and a dataset
in batches. `METRICS` maps a metric name to its runner; `evaluate_metrics` runs a list of them.
"""

from __future__ import annotations

from protoquant.metrics.context import EvalContext, FeatureMemo
from protoquant.metrics.registry import METRICS, get_metric
from protoquant.metrics.result import MetricResult
from protoquant.metrics.runner import evaluate_metrics, format_table, resolve_metrics
from protoquant.metrics.settings import MetricSettings

__all__ = [
    "METRICS",
    "EvalContext",
    "FeatureMemo",
    "MetricResult",
    "MetricSettings",
    "evaluate_metrics",
    "format_table",
    "get_metric",
    "resolve_metrics",
]
