"""What every training stage shares: schedules, accuracy over ranks, DDP wrapping."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protoquant import distributed

logger = logging.getLogger(__name__)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float("nan")


def reduced_accuracy(correct: int, total: int) -> float:
    """Accuracy from per-rank counts summed over ranks (plain ratio in one process)."""
    counts = distributed.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
    return float(counts[0] / counts[1]) if counts[1] else float("nan")


def wrap_ddp(module: nn.Module, device: torch.device, ctx: distributed.Context) -> nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself otherwise.

    Buffers are not broadcast: usage counts are summed over ranks explicitly instead.
    """
    if not ctx.distributed:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep buffers rank-local
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
