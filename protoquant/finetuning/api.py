"""`finetune`: stage -1, the backbone fine-tuned on the training split, then saved for freezing.

The trained module is `protoquant.finetuning.net.FinetuneNet`; the recipe (AdamW, warm-up +
cosine, Mixup / CutMix, label smoothing, AMP) is `protoquant.finetuning.recipe`; the epochs,
validation and early stopping are `protoquant.finetuning.loop`; the folder, its key and resuming
are `protoquant.finetuning.files`. Training images take seeded random-resized crops
(scale `cache.min_crop_scale` to 1) and flips at the backbone's input size; validation images
the plain view (the evaluation transform of the feature cache).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

import protoquant.finetuning.loop as loop
from protoquant import distributed
from protoquant.backbones.frozen import state_hash
from protoquant.backbones.input import resolved_config
from protoquant.config import RunConfig
from protoquant.data import Splits, load_splits, resolve_dataset
from protoquant.data.transforms import ViewTransform, view_transform
from protoquant.errors import ConfigError
from protoquant.finetuning.files import (
    FINETUNE_FORMAT,
    FinetuneResult,
    finetune_folder,
    finetune_key,
    read_finished,
    read_resume,
    training_lock,
    write_outputs,
    write_resume,
)
from protoquant.finetuning.net import FinetuneNet, build_net
from protoquant.finetuning.recipe import autocast_dtype, make_scaler, mixing_enabled, param_groups
from protoquant.paths import absolute

logger = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 16  # DataLoader workers chosen automatically, at most


def check_batches(config: RunConfig, splits: Splits, world_size: int) -> None:
    """Refuse a batch size the processes cannot share, or data too small for it / early stopping.

    Raises:
        ConfigError: naming `finetune.batch_size`, `finetune.patience` or `data.val_fraction`.
    """
    section = config.finetune
    batch = section.batch_size
    if batch % world_size:
        raise ConfigError(
            f"config field 'finetune.batch_size' ({batch}) must be divisible by the {world_size} "
            "processes (WORLD_SIZE): it is the global batch, split evenly over them"
        )
    local = batch // world_size
    if mixing_enabled(section) and local % 2:
        raise ConfigError(
            f"config field 'finetune.batch_size' ({batch}) gives {local} images per process; Mixup / "
            "CutMix pair the images of a batch, so it must be even (or set finetune.mix_prob 0)"
        )
    if len(splits.train) < batch:
        raise ConfigError(
            f"config field 'finetune.batch_size' ({batch}) exceeds the {len(splits.train)} training "
            "images: no full global batch to train on"
        )
    if section.patience > 0 and len(splits.val) == 0:
        raise ConfigError(
            f"config field 'finetune.patience' ({section.patience}) stops early on validation "
            "accuracy, but the validation split is empty: set data.val_fraction > 0 or finetune.patience 0"
        )


def loader_workers(config: RunConfig, batches: int) -> int:
    """finetune.num_workers, or if -1 one per CPU shared by the local ranks (none for a tiny epoch)."""
    if config.finetune.num_workers >= 0:
        return config.finetune.num_workers
    if batches < 2:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _resolved(config: RunConfig) -> RunConfig:
    """Concrete dataset and cache root; the backbone at `finetune.image_size` when that is set."""
    root = str(absolute(config.cache.root)) if config.cache.root else ""
    size = config.finetune.image_size or config.backbone.image_size
    return replace(
        config,
        data=resolve_dataset(config.data),
        cache=replace(config.cache, root=root),
        backbone=replace(config.backbone, image_size=size),
    )


def finetune(config: RunConfig, device: str | torch.device | None = None) -> FinetuneResult:
    """Fine-tune `config.backbone` on the training split as `config.finetune` says, or reuse the
    finished folder of the same key, or resume its interrupted run (see the module docstring).

    Under torchrun every process calls this; rank 0 writes the files.

    Raises:
        ConfigError: a batch size the processes cannot share, early stopping without validation
            images, or a `finetune.out` folder that holds another fine-tuning.
    """
    # A given device was resolved by the caller (under torchrun: cuda:LOCAL_RANK, already set).
    device = distributed.resolve_device(config.device) if device is None else torch.device(device)
    ctx = distributed.init(device)
    config = _resolved(config)
    splits = load_splits(config.data, config.seed)
    check_batches(config, splits, ctx.world_size)
    built = build_net(config.backbone, splits.train.num_classes, config.seed)
    config = replace(config, backbone=resolved_config(config.backbone, built.pretrained))
    chosen = config.backbone
    transform = view_transform(config, chosen.mean, chosen.std)
    key = finetune_key(config, splits.train, splits.val, state_hash(built.net.model), transform.describe())
    folder = finetune_folder(config, key)
    finished = read_finished(folder, key)
    if finished is not None:
        logger.info("fine-tuned weights already in %s", folder)
        return finished
    with training_lock(folder, key) as finished:  # another job of this key may have just finished
        if finished is not None:
            logger.info("fine-tuned weights written meanwhile by another process in %s", folder)
            return finished
        return _train(built.net, splits, config, transform, key, folder, device)


def _train(
    net: FinetuneNet,
    splits: Splits,
    config: RunConfig,
    transform: ViewTransform,
    key: dict,
    folder: Path,
    device: torch.device,
) -> FinetuneResult:
    """Train (from `resume.pt` when there is one), then write the folder; returns its result."""
    ctx, section, start = distributed.context(), config.finetune, time.perf_counter()
    net.to(device)
    optimizer = torch.optim.AdamW(param_groups(net, section))
    scaler = make_scaler(autocast_dtype(device, section.amp))
    progress, best = _restore(folder, key, net, optimizer, scaler)
    data = _epoch_data(splits, config, transform)
    wrapped = _ddp(net, device) if ctx.distributed else net
    steps = len(data.loader)
    trainer = loop.Trainer(wrapped, optimizer, scaler, section, splits.train.num_classes, device, steps)
    while progress.epoch < section.epochs and not loop.stop_early(progress, section.patience):
        row = loop.run_epoch(trainer, data, progress)
        if row["val_accuracy"] is not None and row["val_accuracy"] > progress.best_accuracy:
            progress.best_accuracy, progress.best_epoch = row["val_accuracy"], row["epoch"]
            best = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        if ctx.is_main:
            write_resume(folder, _resume_state(net, optimizer, scaler, progress, best, key))
        distributed.barrier()
    if best is not None:
        net.load_state_dict(best)
    return _finish(net, config, key, folder, progress, time.perf_counter() - start)


def _epoch_data(splits: Splits, config: RunConfig, transform: ViewTransform) -> loop.EpochData:
    train = loop.ImageLabels(splits.train, transform, augment=True)
    val = loop.ImageLabels(splits.val, transform, augment=False)
    workers = loader_workers(config, len(train) // config.finetune.batch_size)
    loader, sampler = loop.train_loader(train, config.finetune, config.seed, workers)
    return loop.EpochData(loader, sampler, train, val, transform, config.seed, workers)


def _restore(folder: Path, key: dict, net, optimizer, scaler) -> tuple[loop.Progress, dict | None]:
    """Load `resume.pt` (if written for `key`) into the objects; returns the progress and best state."""
    resumed = read_resume(folder, key)
    if resumed is None:
        return loop.Progress(), None
    net.load_state_dict(resumed["net"])
    optimizer.load_state_dict(resumed["optimizer"])
    if resumed["scaler"]:  # empty when the scaler is off (bf16, fp32)
        scaler.load_state_dict(resumed["scaler"])
    return loop.Progress(**resumed["progress"]), resumed["best"]


def _ddp(net: FinetuneNet, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def _resume_state(net, optimizer, scaler, progress: loop.Progress, best: dict | None, key: dict) -> dict:
    from protoquant.data.base import stable_hash

    return {
        "key_digest": stable_hash(key),
        "epoch": progress.epoch,
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "best": best,
    }


def _finish(
    net: FinetuneNet, config: RunConfig, key: dict, folder: Path, progress: loop.Progress, seconds: float
) -> FinetuneResult:
    """Write the folder (rank 0; the others wait) and return its result."""
    accuracy = progress.best_accuracy if progress.best_epoch >= 0 else math.nan
    weights_hash = state_hash(net.model)
    meta = {
        "format": FINETUNE_FORMAT,
        "key": key,
        "base_backbone": config.backbone.name,
        "base_weights": config.backbone.weights,
        "base_weights_hash": key["backbone"]["base_hash"],
        "weights_hash": weights_hash,
        "epochs_run": progress.epoch,
        "best_epoch": progress.best_epoch if progress.best_epoch >= 0 else progress.epoch - 1,
        "best_val_accuracy": None if math.isnan(accuracy) else accuracy,
        "history": progress.history,
        "seconds": seconds,
        "processes": distributed.context().world_size,
        "finetune": dataclasses.asdict(config.finetune),
    }
    weights = folder / "backbone.safetensors"
    if distributed.context().is_main:
        weights = write_outputs(folder, net, meta)
        logger.info("fine-tuned weights: %s (best val accuracy %s)", weights, meta["best_val_accuracy"])
    distributed.barrier()
    return FinetuneResult(weights, weights_hash, accuracy, folder)


def finetuned_config(config: RunConfig, result: FinetuneResult) -> RunConfig:
    """`config` reading the fine-tuned weights frozen: backbone.weights = the file, finetune off
    (a rerun of the saved config then uses the same weights instead of fine-tuning them again)."""
    return replace(
        config,
        backbone=replace(config.backbone, weights=str(result.weights)),
        finetune=replace(config.finetune, enabled=False),
    )


def finetune_first(config: RunConfig, device: torch.device, *, backbone_given: bool) -> RunConfig:
    """Stage -1 of a run: `finetune(config)`, then the config that freezes its weights.

    Raises:
        ConfigError: a backbone was passed to the run as well (it would not be the fine-tuned one).
    """
    if backbone_given:
        raise ConfigError(
            "config field 'finetune.enabled': the run fine-tunes and builds its backbone itself; "
            "do not pass a backbone as well"
        )
    return finetuned_config(config, finetune(config, device))
