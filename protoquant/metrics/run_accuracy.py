"""Runner of top-1 accuracy on a cached split."""

from __future__ import annotations

from protoquant.metrics.context import EvalContext
from protoquant.metrics.result import MetricResult


def run_accuracy(ctx: EvalContext) -> MetricResult:
    """Top-1 accuracy on the cached split."""
    correct = 0
    for indices, out in ctx.head_batches():
        correct += int((out.logits.argmax(dim=1).numpy() == ctx.labels[indices]).sum())
    count = len(ctx.dataset)
    return MetricResult(correct / count if count else float("nan"), {"num_images": count})
