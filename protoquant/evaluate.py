"""Evaluate a saved checkpoint on a dataset split, reading (or building) the feature cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from protoquant.data import load_splits
from protoquant.data.transforms import ViewTransform
from protoquant.features import build_cache
from protoquant.model import ProtoQuant
from protoquant.pipeline import GLOBAL_SIZE_THRESHOLD, resolve_device
from protoquant.train import Subset
from protoquant.train_head import evaluate_head, global_size


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    root: str | None = None,
    batch_size: int = 64,
) -> dict:
    """Accuracy and explanation size of checkpoint `path` on `split` of its (or another) dataset."""
    model = ProtoQuant.load(path)
    config = model.config
    data = replace(
        config.data, **{k: v for k, v in {"dataset": dataset, "root": root}.items() if v is not None}
    )
    splits = load_splits(data, config.seed)
    images = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if tuple(images.classes) != model.classes:
        raise ValueError(
            f"dataset {data.dataset} has classes {images.classes[:5]}..., the model was trained on {model.classes[:5]}..."
        )
    device = resolve_device(config.device)
    info = model.backbone.info
    transform = ViewTransform(
        config.backbone.image_size,
        config.backbone.crop_ratio,
        info.mean,
        info.std,
        config.cache.min_crop_scale,
        config.seed,
    )
    store = build_cache(images, model.backbone, transform, views=1, config=config.cache, device=device)
    head = model.head.to(device)
    return {
        "model": str(path),
        "dataset": data.dataset,
        "split": split,
        "num_images": len(images),
        "accuracy": evaluate_head(head, Subset(store, store.entries()), batch_size, device),
        "num_prototypes": global_size(head, GLOBAL_SIZE_THRESHOLD),
        "temperature": head.temperature,
        "seed": config.seed,
        "image_size": config.backbone.image_size,
    }
