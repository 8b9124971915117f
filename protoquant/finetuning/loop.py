"""The epochs of stage -1: train on augmented views, measure validation accuracy, keep the best.

Every epoch draws its randomness from (seed, epoch, rank) alone (the global RNGs are seeded
inside a fork and restored afterwards): the sampler order, the crops (view `1 + epoch` of
`ViewTransform`), Mixup / CutMix and dropout. A run resumed after epoch e therefore takes the
same steps as one that never stopped. Under torchrun the model is wrapped in DDP and each
process trains on its share of every global batch (`GlobalBatches`): the global batches are the
same images on any number of processes, so a run resumed on another process count keeps its
data order. What still depends on the count: BatchNorm statistics (per process), Mixup / CutMix
pairs and dropout (drawn per rank), and float summation order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from protoquant import distributed
from protoquant import progress as bars
from protoquant.config import FinetuneConfig
from protoquant.data.base import ImageDataset
from protoquant.data.transforms import ViewTransform
from protoquant.finetuning.recipe import autocast_dtype, lr_factor, make_loss, make_mixing, set_lr

logger = logging.getLogger(__name__)


class ImageLabels(Dataset):
    """(uint8 pixels (3, S, S), label) of every image: view `1 + epoch` when augmenting, else view 0."""

    def __init__(self, dataset: ImageDataset, transform: ViewTransform, *, augment: bool):
        self.dataset, self.transform, self.augment = dataset, transform, augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        view = 1 + self.epoch if self.augment else 0
        pixels = self.transform.pixels(self.dataset.load_image(index), index, view)
        return pixels, int(self.dataset.labels[index])


@dataclass
class Progress:
    """What `resume.pt` carries besides the tensors: completed epochs, steps, the best epoch so far."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_epoch: int = -1  # 0-based epoch of the best validation accuracy (-1: none yet)
    best_accuracy: float = -math.inf
    history: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def epoch_rng(seed: int, epoch: int, rank: int, device: torch.device) -> Iterator[None]:
    """Seed torch, numpy and random from (seed, epoch, rank); restore all three afterwards."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    value = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(value)
            np.random.seed(value)
            random.seed(value)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@dataclass
class Trainer:
    """One process's training objects (the model possibly DDP-wrapped)."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: FinetuneConfig
    num_classes: int
    device: torch.device
    steps_per_epoch: int

    def __post_init__(self) -> None:
        self.dtype = autocast_dtype(self.device, self.config.amp)
        self.mixing = make_mixing(self.config, self.num_classes)
        self.loss = make_loss(self.config)
        self.total_steps = self.config.epochs * self.steps_per_epoch
        self.warmup_steps = round(self.config.warmup_epochs * self.steps_per_epoch)

    @property
    def module(self) -> torch.nn.Module:
        """The model without its DDP wrapper (evaluation runs on it: no collective per forward)."""
        return getattr(self.net, "module", self.net)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, transform: ViewTransform, step: int) -> float:
        """One optimizer step on a batch of uint8 pixels (B, 3, S, S); returns the batch loss."""
        images = transform.normalise(pixels.to(self.device, non_blocking=True))  # (B, 3, S, S)
        targets = labels.to(self.device, non_blocking=True)  # (B,)
        if self.mixing is not None:
            images, targets = self.mixing(images, targets)  # targets: (B, C) soft
        set_lr(self.optimizer, lr_factor(step, self.warmup_steps, self.total_steps))
        with self.autocast():
            loss = self.loss(self.net(images).float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


def train_epoch(trainer: Trainer, loader: DataLoader, transform: ViewTransform, progress: Progress) -> float:
    """One pass over the loader; returns the mean training loss over every process's batches."""
    trainer.net.train()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # (loss sum, batches)
    shown = bars.bar(loader, desc=f"stage -1: fine-tune epoch {progress.epoch}", unit="batch")
    for pixels, labels in shown:
        total[0] += trainer.step(pixels, labels, transform, progress.step)
        total[1] += 1
        progress.step += 1
    distributed.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] else math.nan


@torch.no_grad()
def accuracy(trainer: Trainer, val: ImageLabels, transform: ViewTransform, batch: int, workers: int) -> float:
    """Top-1 accuracy on the validation images (each process scores its strided share); NaN if none."""
    ctx = distributed.context()
    share = Subset(val, distributed.shard_for_rank(np.arange(len(val)), ctx).tolist())
    counts = torch.zeros(2, dtype=torch.float64, device=trainer.device)  # (correct, images)
    trainer.module.eval()
    for pixels, labels in DataLoader(share, batch_size=batch, num_workers=workers):
        images = transform.normalise(pixels.to(trainer.device))  # (B, 3, S, S)
        with trainer.autocast():
            predicted = trainer.module(images).argmax(dim=1).cpu()  # (B,)
        counts[0] += float((predicted == labels).sum())
        counts[1] += len(labels)
    distributed.all_reduce_sum(counts)
    return float(counts[0] / counts[1]) if counts[1] else math.nan


class GlobalBatches(Sampler[list[int]]):
    """This process's part of every global batch of an epoch, whatever the number of processes.

    The epoch's order is a permutation of the `size` images seeded by (seed, epoch); global batch
    b is order[b * batch_size : (b + 1) * batch_size] (an incomplete last one is dropped) and rank
    r of n trains on its slice [r::n], batch_size / n images.
    """

    def __init__(self, size: int, batch_size: int, seed: int, ctx: distributed.Context) -> None:
        self.size, self.batch_size, self.seed, self.ctx = size, batch_size, seed, ctx
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        rank, world = self.ctx.rank, self.ctx.world_size
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size][rank::world].tolist()


def train_loader(
    train: ImageLabels, config: FinetuneConfig, seed: int, workers: int
) -> tuple[DataLoader, GlobalBatches]:
    """This process's loader of its share (batch_size / processes images) of every global batch."""
    sampler = GlobalBatches(len(train), config.batch_size, seed, distributed.context())
    return DataLoader(train, batch_sampler=sampler, num_workers=workers), sampler


def stop_early(progress: Progress, patience: int) -> bool:
    """Whether `patience` epochs in a row brought no better validation accuracy (patience 0: never)."""
    return patience > 0 and progress.best_epoch >= 0 and progress.epoch - 1 - progress.best_epoch >= patience


@dataclass(frozen=True)
class EpochData:
    """The images of every epoch: the training loader and sampler, both splits, how they are read."""

    loader: DataLoader
    sampler: GlobalBatches
    train: ImageLabels
    val: ImageLabels
    transform: ViewTransform
    seed: int  # the run seed (sampler order, crops, mixing)
    workers: int  # DataLoader workers


def run_epoch(trainer: Trainer, data: EpochData, progress: Progress) -> dict:
    """Train epoch `progress.epoch`, measure it; returns its history row (progress is advanced)."""
    epoch, start = progress.epoch, time.perf_counter()
    data.sampler.set_epoch(epoch)
    data.train.epoch = epoch
    with epoch_rng(data.seed, epoch, distributed.context().rank, trainer.device):
        loss = train_epoch(trainer, data.loader, data.transform, progress)
    local = data.sampler.batch_size // distributed.context().world_size  # images per process
    val_accuracy = accuracy(trainer, data.val, data.transform, local, data.workers)
    factor = lr_factor(max(0, progress.step - 1), trainer.warmup_steps, trainer.total_steps)  # last step's
    row = {
        "epoch": epoch,
        "train_loss": loss,
        "val_accuracy": None if math.isnan(val_accuracy) else val_accuracy,
        "lr": trainer.config.lr * factor,  # the backbone's, at the epoch's last step
        "head_lr": trainer.config.head_lr * factor,
        "seconds": time.perf_counter() - start,
    }
    progress.history.append(row)
    progress.epoch += 1
    logger.info("finetune epoch %d: loss %.4f val accuracy %s", epoch, loss, row["val_accuracy"])
    return row
