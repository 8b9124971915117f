"""One training run end to end: data -> cache -> stage 0 -> stage 1 -> stage 2 -> evaluate -> save."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from protoquant.backbones import FrozenBackbone, create_backbone
from protoquant.config import RunConfig, save_yaml
from protoquant.data import Splits, load_splits
from protoquant.data.transforms import ViewTransform
from protoquant.features import FeatureStore, atomic_write_bytes, build_cache
from protoquant.grounding import nearest_patches
from protoquant.model import ProtoQuant
from protoquant.train import (
    Subset,
    code_usage,
    evaluate_probe,
    evaluate_quantized,
    train_codebook,
    train_probe,
)
from protoquant.train_head import evaluate_head, global_size, train_head

logger = logging.getLogger(__name__)

GLOBAL_SIZE_THRESHOLD = 1e-3  # a prototype counts if max_c w[c, k] exceeds this (METRICS.md)


@dataclass(frozen=True)
class Caches:
    train: Subset  # every view of every training image
    train_plain: Subset  # view 0 of every training image (usage, grounding)
    val: Subset  # view 0 of validation images
    test: Subset  # view 0 of test images


@dataclass(frozen=True)
class RunResult:
    model: ProtoQuant
    metrics: dict
    splits: Splits
    caches: Caches
    out: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_caches(splits: Splits, backbone: FrozenBackbone, config: RunConfig, device: torch.device) -> Caches:
    info = backbone.info
    transform = ViewTransform(
        config.backbone.image_size,
        config.backbone.crop_ratio,
        info.mean,
        info.std,
        config.cache.min_crop_scale,
        config.seed,
    )

    def store(dataset, views: int) -> FeatureStore:
        return build_cache(dataset, backbone, transform, views=views, config=config.cache, device=device)

    train = store(splits.train, config.cache.train_views)
    val, test = store(splits.val, 1), store(splits.test, 1)
    return Caches(
        train=Subset(train, train.entries()),
        train_plain=Subset(train, train.entries(first_view_only=True)),
        val=Subset(val, val.entries()),
        test=Subset(test, test.entries()),
    )


def run(config: RunConfig, *, backbone: FrozenBackbone | None = None) -> RunResult:
    """Train ProtoQuant as `config` says; writes `<out>/model`, `metrics.json`, `config.yaml`, `history.jsonl`."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out / "config.yaml")
    device = resolve_device(config.device)
    start = time.perf_counter()
    splits = load_splits(config.data, config.seed)
    backbone = backbone or create_backbone(config.backbone)
    caches = build_caches(splits, backbone, config, device)
    cache_seconds = time.perf_counter() - start

    train_start = time.perf_counter()
    num_classes = splits.train.num_classes
    probe = train_probe(caches.train, caches.val, num_classes, config.probe, seed=config.seed, device=device)
    codebook, history = train_codebook(
        caches.train, caches.val, probe, config.codebook, seed=config.seed, device=device
    )
    usage = code_usage(codebook.codes, caches.train_plain, config.codebook.batch_size, device)
    head, selection = train_head(
        codebook.codes.detach(),
        usage,
        caches.train,
        caches.val,
        num_classes,
        config.head,
        seed=config.seed,
        device=device,
    )
    train_seconds = time.perf_counter() - train_start

    model = ProtoQuant(backbone, head, splits.train.classes, config)
    model.save(out / "model")
    batch = config.codebook.batch_size
    grounding = nearest_patches(head.codebook, caches.train_plain, batch, device)
    used = usage > 0
    metrics = {
        "data": {
            "dataset": config.data.dataset,
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
            "classes": num_classes,
            "train_views": config.cache.train_views,
        },
        "backbone": {
            "name": backbone.info.name,
            "weights": backbone.info.weights,
            "weights_hash": backbone.info.weights_hash,
            "grid": list(backbone.info.grid),
            "channels": backbone.info.channels,
        },
        "linear_probe": {
            "val_accuracy": evaluate_probe(probe, caches.val, device),
            "test_accuracy": evaluate_probe(probe, caches.test, device),
        },
        "quantized": {
            "val_accuracy": evaluate_quantized(codebook, probe, caches.val, batch, device),
            "test_accuracy": evaluate_quantized(codebook, probe, caches.test, batch, device),
            "num_codes": codebook.num_codes,
            "used_codes": int(used.sum()),
        },
        "protoquant": {
            "val_accuracy": evaluate_head(head, caches.val, batch, device),
            "test_accuracy": evaluate_head(head, caches.test, batch, device),
            "num_prototypes": global_size(head, GLOBAL_SIZE_THRESHOLD),
            "temperature": selection["temperature"],
            "lr": selection["lr"],
            "selection": selection["trials"],
        },
        "grounding": {
            "mean_nearest_cosine_used": float(grounding.cosine[used].mean()) if used.any() else float("nan"),
            "min_nearest_cosine_used": float(grounding.cosine[used].min()) if used.any() else float("nan"),
        },
        "timing": {
            "cache_seconds": cache_seconds,
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start,
        },
    }
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    with open(out / "history.jsonl", "w") as handle:
        for row in history:
            handle.write(json.dumps({"stage": 1, **row}) + "\n")
    logger.info("run finished: %s", json.dumps({k: metrics[k] for k in ("linear_probe", "timing")}))
    return RunResult(model, metrics, splits, caches, out)
