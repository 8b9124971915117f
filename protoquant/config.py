"""Every knob of a run, as frozen dataclasses with the paper's values as defaults.

`RunConfig` nests one dataclass per stage. It round-trips through plain dicts and
YAML, and the CLI derives its `--section.field` flags from these definitions.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"  # registry name, see protoquant.data.DATASETS
    root: str = ""  # dataset folder on disk ("" for generated data)
    val_fraction: float = 0.1  # share of train carved out (stratified) for model selection
    max_train_per_class: int = 0  # 0 = all; otherwise a seeded, stratified subset
    max_test_per_class: int = 0  # 0 = all
    synthetic_classes: int = 10  # built-in data: number of classes
    synthetic_train_per_class: int = 60  # built-in data: train images per class
    synthetic_test_per_class: int = 40  # built-in data: test images per class
    synthetic_seed: int = 0  # built-in data: generator seed
    crop_to_box: bool = False  # cub/cars: crop each image (and its parts) to the object's box
    split_file: str = ""  # image-folder: optional '<relative path> <train|test>' file (relative to root)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "torchvision/mobilenet_v2"  # "timm/<model>" or "torchvision/<model>"
    weights: str = "default"  # "default" (the library's pretrained weights), "none" (random), or a file path
    download: bool = False  # allow the ecosystem to download missing weights (off: fail at once)
    init_seed: int = 0  # seeds random initialisation when weights = "none" (reproducible random backbones)
    image_size: int = 224  # square input side after resize and centre crop
    crop_ratio: float = (
        1.0  # 1: resize to S x S (part-prototype protocols); <1: shorter side to S/ratio, centre crop
    )


@dataclass(frozen=True)
class CacheConfig:
    root: str = "cache"  # folder holding one subfolder per cached (dataset, split, backbone, transform)
    train_views: int = 2  # views per training image: view 0 is the plain centre crop, others augmented
    shard_size: int = 512  # feature maps per shard file
    batch_size: int = 32  # backbone batch size
    num_workers: int = -1  # DataLoader workers decoding images; -1: one per CPU (per local rank), up to 16
    autocast_bf16: bool = False  # compute features under bf16 autocast (stored as fp16 either way)
    grid_pool: int = 1  # average-pool the feature grid by this factor before storing (ViT-B/16: 2 -> 7x7)
    min_crop_scale: float = 0.5  # augmented views: RandomResizedCrop lower area bound


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 100  # full-batch-style passes over pooled features (cheap)
    lr: float = 1e-2  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    batch_size: int = 256


@dataclass(frozen=True)
class CodebookConfig:
    num_codes: int = 1024  # K: codebook size = number of prototypes
    init: str = "kmeans"  # "kmeans" (data, default) or "orthogonal" (random)
    kmeans_patches: int = 100_000  # training patches sampled for k-means initialisation
    kmeans_iters: int = 20  # Lloyd iterations for initialisation
    epochs: int = 15
    lr: float = 1e-3  # Adam learning rate (paper range 5e-4 - 1e-3)
    warmup_epochs: float = 1.0  # linear warmup before cosine decay
    commitment_weight: float = 1.0  # w in CE + w * MSE(code, stopgrad(feature))
    batch_size: int = 64  # feature maps per step
    reset_dead_codes: bool = True  # re-seed codes unused for an epoch from random training patches
    cutmix_prob: float = 0.0  # feature-space CutMix per batch: swaps real patches, so codes stay grounded
    snap_to_patches: bool = (
        False  # after stage 1, replace each code by its nearest training patch (exact grounding)
    )


@dataclass(frozen=True)
class HeadConfig:
    temperature: float = 0.1  # tau of the softmax over codes (paper value)
    temperature_grid: tuple[float, ...] = ()  # if set, tau is chosen on the validation split
    lr: float = 5e-2  # Adam learning rate for the class layer
    lr_grid: tuple[float, ...] = ()  # if set, lr is chosen on the validation split
    epochs: int = 100
    batch_size: int = 256
    weight_init_mean: float = 1.0  # class weights ~ N(mean, std) before the ReLU
    weight_init_std: float = 0.1
    l1: float = 0.0  # L1 penalty on effective class weights (keep tiny: 1e-4 already costs accuracy)
    top_k_per_class: int = 0  # 0 = off; else keep the k largest weights per class and fine-tune
    top_k_epochs: int = 30  # fine-tuning epochs after the top-k limit
    scores_dtype: str = "float32"  # "float16" halves the memory of the fixed (N, K) training scores


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    seed: int = 0  # seeds splits, views, initialisation and shuffling
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    out: str = "runs/default"  # output folder (checkpoint, metrics.json, figures)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            (item_type, _ellipsis) = typing.get_args(annotation)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return tuple(_coerce(v, item_type, where) for v in value)
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation in (int, float, str):
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return annotation(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field '{where}': cannot read {value!r} as {annotation}") from err
    raise TypeError(f"config field '{where}': unsupported type {annotation}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys raise an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"config section '{where or cls.__name__}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(where + k for k in unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, where + name)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-dict form (tuples become lists) suitable for JSON and YAML."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_yaml(path: str | Path) -> RunConfig:
    """Read a RunConfig from a YAML file (missing sections keep their defaults)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config {path}: {err}") from err
    try:
        return from_dict(RunConfig, data)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def flat_fields(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Map 'section.field' -> type annotation for every leaf field (used to build CLI flags)."""
    out: dict[str, Any] = {}
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(flat_fields(hint, f"{prefix}{name}."))
        else:
            out[prefix + name] = hint
    return out


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply {'section.field': value} overrides (values coerced to the field type)."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        *sections, leaf = dotted.split(".")
        node = data
        for section in sections:
            if section not in node or not isinstance(node[section], dict):
                raise ValueError(f"unknown config section in '{dotted}'")
            node = node[section]
        if leaf not in node:
            raise ValueError(f"unknown config field '{dotted}'")
        node[leaf] = value
    return from_dict(RunConfig, data)
