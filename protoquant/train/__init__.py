"""The training stages over cached features: probe (stage 0), codebook (stage 1), head (stage 2)."""

from protoquant.train.codebook import evaluate_quantized, init_codebook, prototype_usage, train_codebook
from protoquant.train.head import evaluate_head, train_head
from protoquant.train.probe import evaluate_probe, train_probe

__all__ = [
    "evaluate_head",
    "evaluate_probe",
    "evaluate_quantized",
    "init_codebook",
    "prototype_usage",
    "train_codebook",
    "train_head",
    "train_probe",
]
