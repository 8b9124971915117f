"""One training run end to end: data -> cache -> stage 0 -> stage 1 -> stage 2 -> evaluate -> save.

`run` resolves the config's "decide for me" values once, before anything reads them, and saves
the resolved config: `data.dataset: auto` becomes the layout found in `data.root`, a relative
`out` or `cache.root` becomes absolute (against the working directory), and the backbone's input
fields (image_size 0, crop_ratio 0, interpolation '', empty mean / std) become the model's
pretrained values. Everything downstream (the cache key, the checkpoint, the gallery, evaluate
and audit) reads concrete values only. An empty `cache.root` stays empty: it names the shared
default cache of the machine that reads it (`protoquant.paths`).

The run folder appears in one step: it is built beside `out` as `.OUT.tmp-PID` and swapped in
(`protoquant.run_folder`), with `outputs.json` written last as its table of contents.
A kill at any moment leaves the previous run folder or the new one, complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from protoquant import distributed
from protoquant.backbones.frozen import FrozenBackbone, create_backbone
from protoquant.backbones.input import resolved_config
from protoquant.cache.build import FeatureStore, build_cache
from protoquant.cache.view import CacheView
from protoquant.codebook import VectorQuantizer
from protoquant.config import WEIGHT_THRESHOLD, RunConfig
from protoquant.data import Splits, load_splits, resolve_dataset
from protoquant.data.base import ImageDataset
from protoquant.data.transforms import view_transform
from protoquant.distributed import resolve_device
from protoquant.explain.grounding import nearest_patches, snap_to_patches
from protoquant.finetuning import finetune_first
from protoquant.gallery_files import model_hash
from protoquant.head import ProtoQuantHead
from protoquant.metrics.result import jsonable
from protoquant.metrics.size import local_sizes, top_shares
from protoquant.model import ProtoQuant
from protoquant.paths import absolute
from protoquant.preflight import preflight
from protoquant.run_folder import tidy_run_folder, write_outputs
from protoquant.train.codebook import evaluate_quantized, prototype_usage, train_codebook
from protoquant.train.head import compute_scores, evaluate_head, global_size, train_head
from protoquant.train.probe import evaluate_probe, train_probe
from protoquant.train.prune import part_coverage, prune_by_usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caches:
    train: CacheView  # every view of every training image
    train_plain: CacheView  # view 0 of every training image (usage, grounding)
    val: CacheView  # view 0 of validation images
    test: CacheView  # view 0 of test images


@dataclass(frozen=True)
class RunResult:
    model: ProtoQuant
    metrics: dict
    splits: Splits
    caches: Caches
    out: Path


def resolve_run_config(config: RunConfig) -> RunConfig:
    """The dataset name made concrete, `out` and a non-empty `cache.root` absolute (module docstring)."""
    root = str(absolute(config.cache.root)) if config.cache.root else ""
    return replace(
        config,
        out=str(absolute(config.out)),
        data=resolve_dataset(config.data),
        cache=replace(config.cache, root=root),
    )


def with_backbone_input(config: RunConfig, backbone: FrozenBackbone) -> RunConfig:
    """`config` with the backbone's input fields concrete; the backbone must have been built for them."""
    resolved = resolved_config(config.backbone, backbone.info.pretrained_input)
    if resolved.image_size != backbone.info.image_size:
        raise ValueError(
            f"the backbone was built for {backbone.info.image_size} px input, the config asks for "
            f"{resolved.image_size} (backbone.image_size {config.backbone.image_size})"
        )
    return replace(config, backbone=resolved)


def build_caches(splits: Splits, backbone: FrozenBackbone, config: RunConfig, device: torch.device) -> Caches:
    info = backbone.info
    transform = view_transform(config, info.mean, info.std)

    def store(dataset, views: int) -> FeatureStore:
        return build_cache(dataset, backbone, transform, views=views, config=config.cache, device=device)

    train = store(splits.train, config.cache.train_views)
    val, test = store(splits.val, 1), store(splits.test, 1)
    return Caches(
        train=CacheView(train, train.entries()),
        train_plain=CacheView(train, train.entries(first_view_only=True)),
        val=CacheView(val, val.entries()),
        test=CacheView(test, test.entries()),
    )


@dataclass(frozen=True)
class Trained:
    probe: torch.nn.Linear
    quantizer: VectorQuantizer
    head: ProtoQuantHead
    history: list[dict]
    selection: dict


def train_stages(
    caches: Caches,
    num_classes: int,
    config: RunConfig,
    device: torch.device,
    *,
    dataset: ImageDataset | None = None,
) -> Trained:
    """Stage 0 (probe), stage 1 (codebook) and stage 2 (head), all from the cache.

    `dataset` (the training split) is read only for `head.min_part_coverage`: its part masks.
    """
    seed = config.seed
    probe = train_probe(caches.train, caches.val, num_classes, config.probe, seed=seed, device=device)
    quantizer, history = train_codebook(
        caches.train, caches.val, probe, config.codebook, seed=seed, device=device, cache=config.cache
    )
    if config.codebook.snap_to_patches:
        with torch.no_grad():
            quantizer.codebook.copy_(
                snap_to_patches(quantizer.codebook, caches.train_plain, config.codebook.batch_size, device)
            )
    usage = prototype_usage(quantizer.codebook, caches.train_plain, config.codebook.batch_size, device)
    codebook, usage = prune_by_usage(quantizer.codebook.detach(), usage, config.head.usage_coverage)
    allowed = on_part_prototypes(codebook, caches, dataset, config, device)
    head, selection = train_head(
        codebook,
        usage,
        caches.train,
        caches.val,
        num_classes,
        config.head,
        seed=seed,
        device=device,
        allowed=allowed,
    )
    return Trained(probe, quantizer, head, history, selection)


PART_COVERAGE_PATCHES = 10  # nearest training patches per prototype that head.min_part_coverage reads


def on_part_prototypes(
    codebook: torch.Tensor, caches: Caches, dataset: ImageDataset | None, config: RunConfig, device
) -> torch.Tensor | None:
    """(K,) bool: prototypes whose nearest patches are on parts (None when the option is off)."""
    threshold = config.head.min_part_coverage
    if not threshold:
        return None
    if dataset is None:
        raise ValueError("head.min_part_coverage needs the training dataset (its part masks)")
    batch = config.codebook.batch_size
    kwargs = dict(top=PART_COVERAGE_PATCHES, batch_size=batch, device=device)
    coverage = part_coverage(codebook, caches.train_plain, dataset, **kwargs)
    logger.info("stage 2: %d of %d prototypes on parts", int((coverage >= threshold).sum()), len(coverage))
    return coverage >= threshold


def accuracies(trained: Trained, caches: Caches, batch: int, device: torch.device) -> dict:
    """Validation and test accuracy of the probe, the quantized model and the head (collective)."""
    out = {}
    for name, subset in (("val", caches.val), ("test", caches.test)):
        out[("linear_probe", name)] = evaluate_probe(trained.probe, subset, device)
        out[("quantized", name)] = evaluate_quantized(trained.quantizer, trained.probe, subset, batch, device)
        out[("protoquant", name)] = evaluate_head(trained.head, subset, batch, device)
    out[("linear_probe", "train")] = evaluate_probe(trained.probe, caches.train_plain, device)
    out[("quantized", "train")] = evaluate_quantized(
        trained.quantizer, trained.probe, caches.train_plain, batch, device
    )
    return {f"{stage}.{split}_accuracy": value for (stage, split), value in out.items()}


UNDER_FIT = 0.9  # stage 1 under-fits when it keeps less of the probe's training accuracy than this


def stage1_fit(accuracy: dict) -> float:
    """Share of the probe's training accuracy the quantized maps keep (view 0 of the training
    images); warns when stage 1 under-fits, which no validation number shows on a small split."""
    fit = accuracy["quantized.train_accuracy"] / max(accuracy["linear_probe.train_accuracy"], 1e-12)
    if fit < UNDER_FIT:
        logger.warning(
            "stage 1 keeps %.0f %% of the linear probe's training accuracy: the codebook under-fits; "
            "raise codebook.lr (e.g. 5e-3), codebook.epochs or codebook.num_prototypes",
            100 * fit,
        )
    return fit


def grounding_summary(head: ProtoQuantHead, caches: Caches, batch: int, device: torch.device) -> dict:
    """Nearest-training-patch cosine of the prototypes that training patches use."""
    nearest = nearest_patches(head.codebook, caches.train_plain, batch, device)
    used = (head.usage > 0).cpu()  # nearest_patches answers on the CPU
    if not used.any():
        return {"mean_nearest_cosine_used": float("nan"), "min_nearest_cosine_used": float("nan")}
    return {
        "mean_nearest_cosine_used": float(nearest.cosine[used].mean()),
        "min_nearest_cosine_used": float(nearest.cosine[used].min()),
    }


SHOWN_PROTOTYPES = 5  # the explanation's default top_prototypes: the share the figure states


def explanation_summary(head: ProtoQuantHead, subset: CacheView, batch: int, device: torch.device) -> dict:
    """How compact the test explanations are: the predicted class's class-specific logit share of
    the 5 largest contributions (mean), and the local size (median, prototypes with
    |score x weight| > WEIGHT_THRESHOLD)."""
    scores = compute_scores(head, subset, batch, device)  # (N, K) on the CPU
    weights = head.class_weights.detach().cpu()  # (C, K)
    predicted = (scores @ weights.t()).argmax(dim=1)  # (N,)
    shares = top_shares(scores, weights, predicted, SHOWN_PROTOTYPES)
    local = local_sizes(scores, weights, predicted, WEIGHT_THRESHOLD)
    return {
        "top5_specific_share_mean": float(shares.nanmean()) if len(shares) else float("nan"),
        "local_size_median": float(local.float().median()) if len(local) else float("nan"),
        "global_size": global_size(head, WEIGHT_THRESHOLD),
        "per_class_max": int((weights > WEIGHT_THRESHOLD).sum(dim=1).max()),
    }


def collect_metrics(
    config: RunConfig, splits: Splits, backbone: FrozenBackbone, trained: Trained, accuracy: dict
) -> dict:
    info, head = backbone.info, trained.head
    return {
        "data": {
            "dataset": config.data.dataset,
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
            "val_split": splits.val_source,
            "classes": splits.train.num_classes,
            "train_views": config.cache.train_views,
        },
        "backbone": {
            "name": info.name,
            "weights": info.weights,
            "weights_hash": info.weights_hash,
            "grid": list(info.grid),
            "channels": info.channels,
            **info.scale_record(),
        },
        "linear_probe": {
            k: accuracy[f"linear_probe.{k}"] for k in ("train_accuracy", "val_accuracy", "test_accuracy")
        },
        "quantized": {
            **{k: accuracy[f"quantized.{k}"] for k in ("train_accuracy", "val_accuracy", "test_accuracy")},
            "train_fit": stage1_fit(accuracy),
            "num_prototypes": trained.quantizer.num_prototypes,
            "used_prototypes": int((head.usage > 0).sum()),
        },
        "protoquant": {
            **{k: accuracy[f"protoquant.{k}"] for k in ("val_accuracy", "test_accuracy")},
            "num_prototypes": global_size(head, WEIGHT_THRESHOLD),
            "temperature": trained.selection["temperature"],
            "lr": trained.selection["lr"],
            "top_k_per_class": trained.selection["top_k"],
            "selection": trained.selection["trials"],
        },
    }


def run(config: RunConfig, *, backbone: FrozenBackbone | None = None) -> RunResult:
    """Train ProtoQuant as `config` says; writes `<out>/model`, `metrics.json`, `config.yaml`,
    `history.jsonl` and `outputs.json`, all at once (see the module docstring).

    Under torchrun every rank runs this; caching and training are sharded, and only
    rank 0 writes the outputs. Undefined values (NaN, e.g. the accuracy on an empty split) are
    recorded as None in metrics.json and history.jsonl.
    """
    device = resolve_device(config.device)
    ctx = distributed.init(device)
    start = time.perf_counter()
    config = resolve_run_config(config)
    if config.finetune.enabled:  # stage -1: fine-tune (or reuse the fine-tuning), then freeze that
        config = finetune_first(config, device, backbone_given=backbone is not None)
    out = Path(config.out)
    if ctx.is_main:
        tidy_run_folder(out)
    splits = load_splits(config.data, config.seed)
    backbone = backbone or create_backbone(config.backbone)
    config = with_backbone_input(config, backbone)
    preflight(config, backbone.info, train=splits.train)  # what needs the backbone and data, before caching
    caches = build_caches(splits, backbone, config, device)
    cache_seconds = time.perf_counter() - start
    train_start = time.perf_counter()
    trained = train_stages(caches, splits.train.num_classes, config, device, dataset=splits.train)
    train_seconds = time.perf_counter() - train_start
    batch = config.codebook.batch_size
    metrics = collect_metrics(config, splits, backbone, trained, accuracies(trained, caches, batch, device))
    model = ProtoQuant(backbone, trained.head, splits.train.classes, config)
    if ctx.is_main:
        metrics["grounding"] = grounding_summary(trained.head, caches, batch, device)
        metrics["explanations"] = explanation_summary(trained.head, caches.test, batch, device)
        metrics["model_hash"] = model_hash(model)
        metrics["timing"] = {
            "cache_seconds": cache_seconds,
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start,
            "processes": ctx.world_size,
        }
        metrics = jsonable(metrics)
        write_outputs(out, config, model, metrics, trained.history)
    distributed.barrier()
    return RunResult(model, metrics, splits, caches, out)
