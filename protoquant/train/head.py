"""Stage 2: the interpretable head on fixed pooled scores.

With frozen prototypes the pooled scores (N, K) of every cached entry are fixed, so they
are computed once per temperature and the class layer trains on them in seconds.
Temperature and learning rate are chosen on the validation split when grids are given.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F

from protoquant import distributed, progress
from protoquant.cache.view import CacheView
from protoquant.config import HeadConfig
from protoquant.head import NonNegativeLinear, ProtoQuantHead
from protoquant.train.common import reduced_accuracy, wrap_ddp

logger = logging.getLogger(__name__)


SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def scores_dtype(config: HeadConfig) -> torch.dtype:
    """The dtype that stage 2 keeps its fixed (N, K) scores in (head.scores_dtype)."""
    if config.scores_dtype not in SCORE_DTYPES:
        raise ValueError(
            f"head.scores_dtype must be one of {sorted(SCORE_DTYPES)}, got {config.scores_dtype!r}"
        )
    return SCORE_DTYPES[config.scores_dtype]


def compute_scores(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) pooled prototype presence of every entry in the subset (on the CPU, as `dtype`)."""
    out = []
    with torch.no_grad():
        batches = subset.store.batches(subset.entries, batch_size)
        steps = -(-len(subset.entries) // batch_size)
        for features, _ in progress.bar(batches, total=steps, desc="prototype scores", unit="batch"):
            out.append(head.scores(features.to(device)).to("cpu", dtype))
    return torch.cat(out)


def all_scores(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) scores of every entry on every rank; under torchrun each rank computes its share."""
    shard = CacheView(subset.store, distributed.shard_for_rank(subset.entries, ctx))
    return distributed.gather_strided(
        compute_scores(head, shard, batch_size, device, dtype), len(subset.entries), ctx
    )


def fit_class_layer(
    layer: NonNegativeLinear,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    epochs: int,
    config: HeadConfig,
    seed: int,
    ctx: distributed.Context | None = None,
) -> float:
    """Train `layer` in place on (scores, labels); keep the best-on-validation weights.

    `train` holds every training row (on every rank); under torchrun each rank trains on
    its part of every global batch with DDP. `val` holds this rank's share of the
    validation rows; counts are summed over ranks. Returns the best validation accuracy.
    """
    ctx = ctx or distributed.context()
    (x_train, y_train), (x_val, y_val) = train, val
    device = layer.weight.device
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    model = wrap_ddp(layer, device, ctx)
    optimizer = torch.optim.Adam([layer.weight], lr=lr)
    best_acc, best_state = -1.0, None
    bar = progress.bar(range(epochs), desc=f"stage 2: class layer lr={lr:g}", unit="epoch")
    for epoch in bar:
        for rows in distributed.rank_batches(np.arange(len(y_train)), config.batch_size, seed, epoch, ctx):
            batch = torch.from_numpy(rows).to(device)
            loss = F.cross_entropy(model(x_train[batch].float()), y_train[batch])
            if config.l1:
                loss = loss + config.l1 * layer.effective_weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            correct = int((layer(x_val.float()).argmax(1) == y_val).sum())
        val_acc = reduced_accuracy(correct, len(y_val))
        bar.set_postfix(val=val_acc)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(layer.state_dict())
    layer.load_state_dict(best_state)
    return best_acc


def limit_top_k(layer: NonNegativeLinear, k: int) -> None:
    """Keep only the k largest effective weights of every class (sets the mask)."""
    weights = layer.effective_weight.detach()  # (C, K)
    top = weights.topk(min(k, weights.shape[1]), dim=1).indices  # (C, k)
    mask = torch.zeros_like(weights).scatter_(1, top, 1.0)
    layer.mask.copy_(mask)


def train_head(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    train: CacheView,
    val: CacheView,
    num_classes: int,
    config: HeadConfig,
    *,
    seed: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> tuple[ProtoQuantHead, dict]:
    """Stage 2 with frozen prototypes; returns the head and the selection record (grid, choice, val accuracy)."""
    ctx = ctx or distributed.context()
    val = CacheView(val.store, distributed.shard_for_rank(val.entries, ctx))
    dtype = scores_dtype(config)
    trials, best = [], None
    for temperature in config.temperature_grid or (config.temperature,):
        head = _new_head(codebook, usage, num_classes, config, temperature, seed).to(device)
        train_scores = (all_scores(head, train, config.batch_size, device, ctx, dtype), train.labels)
        val_scores = (compute_scores(head, val, config.batch_size, device, dtype), val.labels)
        grid = progress.bar(config.lr_grid or (config.lr,), desc=f"stage 2: tau={temperature:g}", unit="fit")
        for lr in grid:
            candidate = _new_head(codebook, usage, num_classes, config, temperature, seed).to(device)
            fit = dict(lr=lr, epochs=config.epochs, config=config, seed=seed, ctx=ctx)
            val_acc = fit_class_layer(candidate.class_layer, train_scores, val_scores, **fit)
            trials.append({"temperature": temperature, "lr": lr, "val_accuracy": val_acc})
            logger.info("stage 2: tau %.3g lr %.3g -> val %.4f", temperature, lr, val_acc)
            grid.set_postfix(lr=f"{lr:g}", val=val_acc)
            if best is None or val_acc > best[0]:
                best = (val_acc, candidate, (train_scores, val_scores), fit)
    val_acc, head, (train_scores, val_scores), fit = best
    if config.top_k_per_class:
        limit_top_k(head.class_layer, config.top_k_per_class)
        val_acc = fit_class_layer(
            head.class_layer, train_scores, val_scores, **{**fit, "epochs": config.top_k_epochs}
        )
    head.requires_grad_(False).eval()
    selection = {"temperature": head.temperature, "lr": fit["lr"], "val_accuracy": val_acc, "trials": trials}
    return head, selection


def _new_head(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    num_classes: int,
    config: HeadConfig,
    temperature: float,
    seed: int,
) -> ProtoQuantHead:
    torch.manual_seed(seed)
    head = ProtoQuantHead(
        codebook,
        num_classes,
        temperature=temperature,
        init_mean=config.weight_init_mean,
        init_std=config.weight_init_std,
    )
    head.usage.copy_(usage)
    return head


def evaluate_head(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context | None = None,
) -> float:
    """Accuracy of the head on cached features; each rank scores its share."""
    shard = CacheView(subset.store, distributed.shard_for_rank(subset.entries, ctx or distributed.context()))
    scores = compute_scores(head, shard, batch_size, device)
    with torch.no_grad():
        predicted = head.class_layer(scores.to(device)).argmax(1).cpu()
    return reduced_accuracy(int((predicted == shard.labels).sum()), len(shard.entries))


def global_size(head: ProtoQuantHead, threshold: float) -> int:
    """Number of prototypes with max_c w[c, k] > threshold (global explanation size)."""
    return int((head.class_weights.amax(dim=0) > threshold).sum())
