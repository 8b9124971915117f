"""Stage 2: the interpretable head on fixed pooled scores.

With frozen prototypes the pooled scores (N, K) of every cached entry are fixed, so they
are computed once per temperature and the class layer trains on them in seconds. They stay in
memory up to `head.scores_memory_mb`, else in scratch files read batch by batch
(`protoquant.train.scores`); both give the same batches and the same head.
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
from protoquant.train.prune import margin_priority
from protoquant.train.score_tables import TrainingScores, as_training_scores
from protoquant.train.scores import SCORE_DTYPES, ScoresSource, all_scores, compute_scores, scores_dtype

logger = logging.getLogger(__name__)

__all__ = [  # the scores helpers moved to protoquant.train.scores; importable from here as before
    "SCORE_DTYPES",
    "all_scores",
    "compute_scores",
    "evaluate_head",
    "fit_class_layer",
    "global_size",
    "limit_sparse",
    "limit_top_k",
    "scores_dtype",
    "train_head",
    "validation_fit",
]


def fit_class_layer(
    layer: NonNegativeLinear,
    train: TrainingScores | tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    epochs: int,
    config: HeadConfig,
    seed: int,
    ctx: distributed.Context | None = None,
) -> float:
    """Train `layer` in place on (scores, labels); keep the best-on-validation weights.

    Best = highest validation accuracy, ties broken by the lower validation cross-entropy (a small
    validation split saturates early, and the first epoch to reach the top accuracy is rarely the
    best-separating one). `train` holds every training row (on every rank): (scores (N, K), labels
    (N,)) or a `TrainingScores` table, in memory or on disk, read batch by batch; under torchrun each
    rank trains on its part of every global batch with DDP. `val` holds this rank's share of the
    validation rows; counts and losses are summed over ranks. Returns the best validation accuracy.
    """
    ctx = ctx or distributed.context()
    device = layer.weight.device
    table = as_training_scores(train).on(device)
    x_val, y_val = (t.to(device) for t in val)
    model = wrap_ddp(layer, device, ctx)
    optimizer = torch.optim.Adam([layer.weight], lr=lr)
    best, best_state = (-1.0, 0.0), None
    bar = progress.bar(range(epochs), desc=f"stage 2: class layer lr={lr:g}", unit="epoch")
    for epoch in bar:
        for rows in distributed.rank_batches(np.arange(len(table)), config.batch_size, seed, epoch, ctx):
            scores, labels = table.batch(rows)  # (B, K) float32, (B,)
            loss = F.cross_entropy(model(scores), labels)
            if config.l1:
                loss = loss + config.l1 * layer.effective_weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_acc, val_loss = validation_fit(layer, (x_val, y_val))
        bar.set_postfix(val=val_acc)
        if (val_acc, -val_loss) > best:
            best, best_state = (val_acc, -val_loss), copy.deepcopy(layer.state_dict())
    layer.load_state_dict(best_state)
    return best[0]


def validation_fit(layer: NonNegativeLinear, val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `layer` on this rank's validation rows, reduced over ranks."""
    x_val, y_val = (t.to(layer.weight.device) for t in val)
    with torch.no_grad():
        logits = layer(x_val.float())
        correct = int((logits.argmax(1) == y_val).sum())
        total_loss = F.cross_entropy(logits, y_val, reduction="sum").double().cpu()
    loss = distributed.all_reduce_sum(torch.stack([total_loss, torch.tensor(float(len(y_val)))]))
    return reduced_accuracy(correct, len(y_val)), float(loss[0] / loss[1]) if loss[1] else float("nan")


def limit_top_k(layer: NonNegativeLinear, k: int, priority: torch.Tensor | None = None) -> None:
    """Keep only k weights of every class (sets the mask): the k largest `priority` (C, K) entries
    among the weights still allowed, by default the k largest effective weights."""
    weights = layer.effective_weight.detach()  # (C, K)
    rank = weights if priority is None else priority.to(weights)
    rank = rank.masked_fill(layer.mask == 0, float("-inf"))  # a removed weight never comes back
    top = rank.topk(min(k, weights.shape[1]), dim=1).indices  # (C, k)
    mask = torch.zeros_like(weights).scatter_(1, top, 1.0) * layer.mask
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
    allowed: torch.Tensor | None = None,
) -> tuple[ProtoQuantHead, dict]:
    """Stage 2 with frozen prototypes; returns the head and the selection record.

    For every temperature the dense class layer is fitted for every learning rate; then, when
    `top_k_per_class` is set, each temperature's best dense layer is cut to k prototypes per
    class (`limit_sparse`) and fine-tuned. The choice is made on the validation split only:
    the most accurate (ties: lowest validation loss) dense head, or the most accurate cut head
    of the first k (`top_k_per_class`, then `top_k_fallback`) that stays within
    `top_k_tolerance` of the dense head's validation accuracy and `top_k_loss_tolerance` of its
    validation loss. `allowed` (K,) bool, when given, names the prototypes the top-k limit may keep (e.g. not background: `part_coverage`).
    """
    ctx = ctx or distributed.context()
    val = CacheView(val.store, distributed.shard_for_rank(val.entries, ctx))
    temperatures = config.temperature_grid or (config.temperature,)
    tables = len(temperatures) if config.top_k_per_class else 1  # the top-k cut reads every table
    trials, dense = [], []

    def make_head(temperature: float) -> ProtoQuantHead:
        return _new_head(codebook, usage, num_classes, config, temperature, seed).to(device)

    with ScoresSource(train, config, ctx, prototypes=len(codebook), tables=tables) as source:
        for temperature in temperatures:
            head = make_head(temperature)
            train_scores = source.compute(head, device)
            val_scores = (compute_scores(head, val, config.batch_size, device, source.dtype), val.labels)
            fit = dict(epochs=config.epochs, config=config, seed=seed, ctx=ctx)
            trial, fitted, _, fit = _best_dense(
                make_head, temperature, (train_scores, val_scores), fit, trials
            )
            keep = train_scores if config.top_k_per_class else None  # only the cut reads them again
            dense.append((trial, fitted, (keep, val_scores), fit))
            del train_scores, keep  # without the cut, one temperature's training scores live at a time
        chosen = max(dense, key=lambda item: _rank(item[0]))
        if config.top_k_per_class:
            chosen = _choose_sparse(dense, chosen, config, trials, allowed)
    trial, head, _, fit = chosen
    head.requires_grad_(False).eval()
    selection = {**{k: trial[k] for k in ("temperature", "lr", "top_k", "val_accuracy")}, "trials": trials}
    return head, selection


def _best_dense(make_head, temperature: float, scores: tuple, fit: dict, trials: list[dict]) -> tuple:
    """(trial, head, scores, fit) of the best dense fit of one temperature over the lr grid."""
    best, config = None, fit["config"]
    grid = progress.bar(config.lr_grid or (config.lr,), desc=f"stage 2: tau={temperature:g}", unit="fit")
    for lr in grid:
        candidate = make_head(temperature)
        fit_class_layer(candidate.class_layer, *scores, lr=lr, **fit)
        trial = _trial(candidate, scores[1], temperature=temperature, lr=lr, top_k=0)
        trials.append(trial)
        grid.set_postfix(lr=f"{lr:g}", val=trial["val_accuracy"])
        if best is None or _rank(trial) > _rank(best[0]):
            best = (trial, candidate, scores, {"lr": lr, **fit})
    return best


def _rank(trial: dict) -> tuple[float, float]:
    """Validation order of two fits: accuracy first, then the lower validation loss."""
    return trial["val_accuracy"], -trial["val_loss"]


def _trial(head: ProtoQuantHead, val: tuple[torch.Tensor, torch.Tensor], **record) -> dict:
    accuracy, loss = validation_fit(head.class_layer, val)
    logger.info("stage 2: %s -> val %.4f (loss %.4f)", record, accuracy, loss)
    return {**record, "val_accuracy": accuracy, "val_loss": loss}


def _choose_sparse(dense: list, reference: tuple, config: HeadConfig, trials: list[dict], allowed):
    """The cut head of the first k in (top_k_per_class, *top_k_fallback) within tolerance of the
    dense `reference` on validation, in accuracy and in loss; a 0 in the fallback stands for
    `reference` itself."""
    candidates, target = [], reference[0]["val_accuracy"] - config.top_k_tolerance
    loss_limit = reference[0]["val_loss"] * (1 + config.top_k_loss_tolerance)
    for k in (config.top_k_per_class, *config.top_k_fallback):
        if k == 0:
            logger.warning("stage 2: every k lost validation accuracy; the head stays dense")
            return reference
        candidates = [_cut(item, k, config, trials, allowed) for item in dense]
        best = max(candidates, key=lambda item: _rank(item[0]))
        if best[0]["val_accuracy"] >= target and best[0]["val_loss"] <= loss_limit:
            return best
        logger.info("stage 2: k = %d loses validation accuracy or loss; trying the next k", k)
    logger.warning("stage 2: k = %d loses validation accuracy against the dense head", k)
    return max(candidates, key=lambda item: _rank(item[0]))


def _cut(item: tuple, k: int, config: HeadConfig, trials: list[dict], allowed) -> tuple:
    """A copy of a dense fit limited to k prototypes per class and fine-tuned (`limit_sparse`)."""
    trial, dense_head, (train_scores, val_scores), fit = item
    head = copy.deepcopy(dense_head)
    limit_sparse(head.class_layer, k, train_scores, val_scores, config, fit, allowed=allowed)
    record = {"temperature": trial["temperature"], "lr": trial["lr"], "top_k": k}
    cut_trial = _trial(head, val_scores, **record)
    trials.append(cut_trial)
    return cut_trial, head, (train_scores, val_scores), fit


def limit_sparse(
    layer: NonNegativeLinear,
    k: int,
    train: TrainingScores | tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: HeadConfig,
    fit: dict,
    *,
    allowed: torch.Tensor | None = None,
) -> None:
    """Keep each class's k prototypes of highest `class_margin_priority`, then fine-tune in place.

    `train`: (scores (N, K), labels (N,)) or a `TrainingScores` table (its per-class means are
    computed batch by batch). `allowed` (K,) bool, when given, limits the choice to those prototypes.

    The kept weights restart from `weight_init_mean` (the dense weights were fitted next to
    hundreds of others and are far too small alone) and train for `top_k_epochs` at `top_k_lr`.
    """
    weights = layer.effective_weight.detach().cpu()  # (C, K)
    priority = margin_priority(weights, as_training_scores(train).class_means(len(weights)).cpu())
    if allowed is not None:
        with torch.no_grad():
            layer.mask.mul_(allowed.to(layer.mask)[None])  # (C, K) * (1, K)
    limit_top_k(layer, k, priority)
    generator = torch.Generator().manual_seed(fit["seed"])
    restart = torch.empty(layer.weight.shape).normal_(
        config.weight_init_mean, config.weight_init_std, generator=generator
    )  # drawn on the CPU: the same weights on every device
    with torch.no_grad():
        layer.weight.copy_(restart)
    tune = {**fit, "lr": config.top_k_lr, "epochs": config.top_k_epochs}
    fit_class_layer(layer, train, val, **tune)


def _new_head(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    num_classes: int,
    config: HeadConfig,
    temperature: float,
    seed: int,
) -> ProtoQuantHead:
    head = ProtoQuantHead(
        codebook,
        num_classes,
        temperature=temperature,
        init_mean=config.weight_init_mean,
        init_std=config.weight_init_std,
        generator=torch.Generator().manual_seed(seed),
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
