"""Stage 0: a linear probe on pooled cached features, early-stopped on validation.

It is the frozen classifier stage 1 trains the codebook through, and the accuracy reference
the interpretable head is compared against.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protoquant import distributed, progress
from protoquant.cache.view import CacheView
from protoquant.config import ProbeConfig
from protoquant.train.common import reduced_accuracy, wrap_ddp

logger = logging.getLogger(__name__)


def new_probe(channels: int, num_classes: int, seed: int) -> nn.Linear:
    """nn.Linear(D, C) with PyTorch's default init, U(-1/sqrt(D), 1/sqrt(D)) for weight and bias,
    drawn from a generator seeded with `seed` (the global generator is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(channels, num_classes, device="meta").to_empty(device="cpu")
    bound = 1.0 / math.sqrt(channels)
    with torch.no_grad():
        probe.weight.uniform_(-bound, bound, generator=generator)
        probe.bias.uniform_(-bound, bound, generator=generator)
    return probe


def train_probe(
    train: CacheView,
    val: CacheView,
    num_classes: int,
    config: ProbeConfig,
    *,
    seed: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> nn.Linear:
    """Linear probe on spatially pooled features; returns the best-on-validation probe (frozen)."""
    ctx = ctx or distributed.context()
    x_train = train.store.pooled()[train.entries].to(device)  # (N, D)
    y_train = train.labels.to(device)
    probe = new_probe(x_train.shape[1], num_classes, seed).to(device)
    model = wrap_ddp(probe, device, ctx)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_acc, best_state = -1.0, None
    epochs = progress.bar(range(config.epochs), desc="stage 0: linear probe", unit="epoch")
    for epoch in epochs:
        for rows in distributed.rank_batches(np.arange(len(y_train)), config.batch_size, seed, epoch, ctx):
            batch = torch.from_numpy(rows).to(device)
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_acc = evaluate_probe(probe, val, device, ctx)
        epochs.set_postfix(val=val_acc)
        logger.info("stage 0 epoch %d: val %.4f", epoch, val_acc)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(probe.state_dict())
    probe.load_state_dict(best_state)
    probe.requires_grad_(False).eval()
    logger.info("stage 0: best val accuracy %.4f", best_acc)
    return probe


def evaluate_probe(
    probe: nn.Linear, subset: CacheView, device: torch.device, ctx: distributed.Context | None = None
) -> float:
    """Accuracy of the probe on pooled features; each rank scores its share."""
    entries = distributed.shard_for_rank(subset.entries, ctx or distributed.context())
    with torch.no_grad():
        logits = probe(subset.store.pooled()[entries].to(device))
    labels = torch.from_numpy(subset.store.labels[entries]).to(device)
    return reduced_accuracy(int((logits.argmax(1) == labels).sum()), len(entries))
