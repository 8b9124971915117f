"""The metric registry: a metric's name -> its runner (a plain dict; unknown names list the valid ones)."""

from __future__ import annotations

from collections.abc import Callable

from protoquant.metrics.context import EvalContext
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
