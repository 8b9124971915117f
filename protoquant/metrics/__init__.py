"""Interpretability metrics with the published protocols (see METRICS.md).

Each metric family is a module of pure functions over tensors (`size`, `consistency`, `purity`,
`misalignment`, `funnybirds`, `grounding`) plus a thin runner that feeds it a model and a dataset
in batches. `METRICS` maps a metric name to its runner; `evaluate_metrics` runs a list of them.
"""

from __future__ import annotations

from collections.abc import Callable

from protoquant.metrics.context import EvalContext, FeatureMemo
from protoquant.metrics.result import MetricResult
from protoquant.metrics.run_accuracy import run_accuracy
from protoquant.metrics.run_consistency import run_consistency
from protoquant.metrics.run_funnybirds import run_funnybirds
from protoquant.metrics.run_grounding import run_grounding
from protoquant.metrics.run_misalignment import run_misalignment
from protoquant.metrics.run_placement import run_placement
from protoquant.metrics.run_purity import run_purity
from protoquant.metrics.run_size import run_size
from protoquant.metrics.run_stability import run_stability
from protoquant.metrics.runner import evaluate_metrics, format_table, resolve_metrics
from protoquant.metrics.settings import MetricSettings

# name -> runner(EvalContext) -> MetricResult
METRICS: dict[str, Callable[[EvalContext], MetricResult]] = {
    "accuracy": run_accuracy,
    "size": run_size,
    "consistency": run_consistency,
    "stability": run_stability,
    "purity": run_purity,
    "misalignment": run_misalignment,
    "funnybirds": run_funnybirds,
    "grounding": run_grounding,
    "placement": run_placement,
}


def get_metric(name: str) -> Callable[[EvalContext], MetricResult]:
    """The runner registered as `name`; an unknown name raises listing the valid ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")
    return METRICS[name]


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
