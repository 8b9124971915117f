"""Every knob of a run, as frozen dataclasses with the paper's values as defaults.

`RunConfig` nests one dataclass per stage. It round-trips through plain dicts and
YAML, and the CLI derives its `--section.field` flags from these definitions.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from protoquant.errors import ConfigError
from protoquant.knobs import Checked, coerce, knob

logger = logging.getLogger(__name__)

Interpolation = Literal["", "nearest", "bilinear", "bicubic"]  # '' = the model's pretrained one
PrototypeInit = Literal["kmeans", "orthogonal"]
ScoresDtype = Literal["float32", "float16"]
SEED_MAX = 2**32 - 1  # the largest seed numpy, torch and Python's random all accept
RGB_CHANNELS = 3  # values of backbone.mean / backbone.std when set

WEIGHT_THRESHOLD = (
    1e-3  # prototype k counts for class c if w[c, k] exceeds this (METRICS.md explanation size)
)


@dataclass(frozen=True)
class DataConfig(Checked):
    section = "data."

    dataset: str = knob(
        "auto",
        "'auto': the built-in synthetic data without a root, else the layout found in data.root; "
        "or a registry name: synthetic, fashion-mnist, cub, cars, imagenet, funnybirds, image-folder",
    )
    root: str = knob("", "dataset folder on disk ('' for generated data)")
    val_fraction: float = knob(
        0.1,
        "share of train carved out (seeded, stratified) for model selection, unless the data has a val split",
        minimum=0.0,
        maximum=0.9,
    )
    test_fraction: float = knob(
        0.2,
        "image-folder without a test split (root/<class>/*): share of every class carved out as test",
        above=0.0,
        maximum=0.9,
    )
    split_seed: int = knob(
        0,
        "image-folder: seeds that carved test split (not the run seed: every run seed sees one test set)",
        minimum=0,
        maximum=SEED_MAX,
    )
    max_train_per_class: int = knob(0, "0 = all; otherwise a seeded, stratified subset", minimum=0)
    max_test_per_class: int = knob(0, "0 = all; otherwise a seeded, stratified subset", minimum=0)
    synthetic_classes: int = knob(10, "built-in data: number of classes", minimum=2)
    synthetic_train_per_class: int = knob(60, "built-in data: training images per class", minimum=1)
    synthetic_test_per_class: int = knob(40, "built-in data: test images per class", minimum=1)
    synthetic_seed: int = knob(0, "built-in data: generator seed", minimum=0, maximum=SEED_MAX)
    crop_to_box: bool = knob(False, "cub/cars: crop each image (and its parts) to the object's box")
    split_file: str = knob(
        "", "image-folder: optional '<relative path> <train|val|test>' file, relative to the root"
    )


@dataclass(frozen=True)
class BackboneConfig(Checked):
    section = "backbone."

    name: str = knob(
        "torchvision/mobilenet_v2", "'timm/<model>', 'timm/hf-hub:<org>/<name>' or 'torchvision/<model>'"
    )
    weights: str = knob(
        "default", "'default' (the model's pretrained weights), 'none' (random) or a file path"
    )
    download: bool = knob(False, "allow downloading missing weights (off: fail at once, offline)")
    init_seed: int = knob(
        0, "seeds the random initialisation when weights = 'none'", minimum=0, maximum=SEED_MAX
    )
    image_size: int = knob(
        0, "square input side S; 0 = the model's pretrained input size (at least 16 px)", minimum=0
    )
    crop_ratio: float = knob(
        1.0,
        "1: resize the whole image to S x S (as the part-prototype protocols need); 0: the model's "
        "crop_pct; in (0, 1): shorter side to S / ratio, then centre crop",
        minimum=0.0,
        maximum=1.0,
    )
    interpolation: Interpolation = knob("", "resize interpolation; '' = the model's pretrained one")
    mean: tuple[float, ...] = knob((), "normalisation mean, 3 values (R, G, B); empty = the model's")
    std: tuple[float, ...] = knob((), "normalisation std, 3 values (R, G, B); empty = the model's", above=0.0)
    stage: int = knob(
        -1,
        "feature map from stage n of the backbone's feature pyramid (0 = finest; timm feature_info, "
        "torchvision stages): finer grid, smaller receptive field; -1 = the model's last map",
        minimum=-1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (0, RGB_CHANNELS):
                raise ConfigError(
                    f"config field 'backbone.{name}' needs {RGB_CHANNELS} values (R, G, B) or none, got {values}"
                )


@dataclass(frozen=True)
class CacheConfig(Checked):
    section = "cache."

    root: str = knob(
        "",
        "folder of one subfolder per cached (dataset, split, backbone, transform); '' = $PROTOQUANT_CACHE, "
        "else $XDG_CACHE_HOME/protoquant/features, else ~/.cache/protoquant/features (shared by every "
        "run); a relative path is taken from the working directory and recorded absolute",
    )
    train_views: int = knob(
        2, "views per training image: view 0 is the plain crop, the others augmented", minimum=1
    )
    shard_size: int = knob(512, "feature maps per shard file", minimum=1)
    batch_size: int = knob(32, "backbone batch size", minimum=1)
    num_workers: int = knob(
        -1, "DataLoader workers decoding images; -1: one per CPU (per local rank), up to 16", minimum=-1
    )
    autocast_bf16: bool = knob(False, "compute features under bf16 autocast (stored as fp16 either way)")
    grid_pool: int = knob(
        1, "average-pool the feature grid by this factor before storing (ViT-B/16: 2 -> 7 x 7)", minimum=1
    )
    min_crop_scale: float = knob(
        0.5, "augmented views: RandomResizedCrop lower area bound", above=0.0, maximum=1.0
    )


@dataclass(frozen=True)
class ProbeConfig(Checked):
    """Stage 0: the linear probe on pooled features, the accuracy reference."""

    section = "probe."

    epochs: int = knob(100, "passes over the pooled features (cheap)", minimum=1)
    lr: float = knob(1e-2, "AdamW learning rate", above=0.0)
    weight_decay: float = knob(1e-4, "AdamW weight decay", minimum=0.0)
    batch_size: int = knob(256, "pooled feature vectors per step", minimum=1)


@dataclass(frozen=True)
class CodebookConfig(Checked):
    """Stage 1: the codebook of K prototypes, learned by vector quantization of patch features."""

    section = "codebook."

    num_prototypes: int = knob(1024, "K: codebook size = number of prototypes", minimum=1)
    init: PrototypeInit = knob("kmeans", "k-means on training patches (default) or orthogonal random")
    kmeans_patches: int = knob(100_000, "training patches sampled for the k-means initialisation", minimum=1)
    kmeans_iters: int = knob(20, "Lloyd iterations of the k-means initialisation", minimum=1)
    epochs: int = knob(15, "stage-1 epochs over the cached training maps", minimum=1)
    lr: float = knob(1e-3, "Adam learning rate (paper range 5e-4 - 1e-3)", above=0.0)
    warmup_epochs: float = knob(1.0, "linear warmup before the cosine decay", minimum=0.0)
    commitment_weight: float = knob(1.0, "w in CE + w * MSE(prototype, stopgrad(feature))", minimum=0.0)
    batch_size: int = knob(64, "feature maps per step", minimum=1)
    reset_dead_prototypes: bool = knob(
        True, "re-seed prototypes unused for an epoch from random training patches"
    )
    cutmix_prob: float = knob(
        0.0,
        "feature-space CutMix per batch: swaps real patches, so prototypes stay grounded",
        minimum=0.0,
        maximum=1.0,
    )
    snap_to_patches: bool = knob(
        False, "after stage 1, replace each prototype by its nearest training patch (exact grounding)"
    )


@dataclass(frozen=True)
class HeadConfig(Checked):
    """Stage 2: similarity -> softmax(tau) -> max -> the non-negative class layer."""

    section = "head."

    temperature: float = knob(0.1, "tau of the softmax over prototypes; 0.1 is the paper value", above=0.0)
    temperature_grid: tuple[float, ...] = knob(
        (), "if set, tau is chosen from these on the validation split", above=0.0
    )
    lr: float = knob(5e-2, "Adam learning rate of the class layer", above=0.0)
    lr_grid: tuple[float, ...] = knob(
        (), "if set, lr is chosen from these on the validation split", above=0.0
    )
    epochs: int = knob(100, "stage-2 epochs over the fixed pooled scores", minimum=1)
    batch_size: int = knob(256, "pooled score vectors per step", minimum=1)
    weight_init_mean: float = knob(1.0, "class weights ~ N(mean, std) before the ReLU")
    weight_init_std: float = knob(0.1, "class weights ~ N(mean, std) before the ReLU", minimum=0.0)
    l1: float = knob(
        0.0, "L1 penalty on the effective class weights (keep tiny: 1e-4 already costs accuracy)", minimum=0.0
    )
    top_k_per_class: int = knob(
        5,
        "k prototypes per class (the reference's 5): each class keeps the k that best separate it "
        "from the others on its training images, re-fitted; 0 = off (every prototype weighted)",
        minimum=0,
    )
    top_k_fallback: tuple[int, ...] = knob(
        (10, 20, 0),
        "larger k tried in order when k loses more than top_k_tolerance of validation accuracy; "
        "0 = every prototype (the dense head: never lose accuracy for compactness)",
        minimum=0,
    )
    top_k_tolerance: float = knob(
        0.01, "validation accuracy a top-k head may lose against the dense head", minimum=0.0, maximum=1.0
    )
    top_k_loss_tolerance: float = knob(
        0.05,
        "share by which a top-k head's validation loss may exceed the dense head's (a finer check "
        "than accuracy on a small validation split)",
        minimum=0.0,
    )
    top_k_epochs: int = knob(100, "fine-tuning epochs after the top-k limit", minimum=1)
    top_k_lr: float = knob(
        0.5, "Adam learning rate of the fine-tuning: k small scores need large weights", above=0.0
    )
    min_part_coverage: float = knob(
        0.0,
        "data with part masks only: above 0, the top-k never keeps a prototype whose 10 nearest "
        "training patches average less than this share of part pixels (background); 0 = off",
        minimum=0.0,
        maximum=1.0,
    )
    usage_coverage: float = knob(
        1.0,
        "below 1: before stage 2, keep only the most-used prototypes that are nearest to this share "
        "of the training patches (the softmax then spreads over fewer); 1 = keep every prototype",
        above=0.0,
        maximum=1.0,
    )
    scores_dtype: ScoresDtype = knob(
        "float32", "dtype of the fixed (N, K) training scores; float16 halves their memory"
    )


@dataclass(frozen=True)
class RunConfig(Checked):
    """One run: a section per step of the data flow, then the run-wide fields."""

    section = ""

    data: DataConfig = field(default_factory=DataConfig)  # dataset, folder and splits
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # frozen backbone, weights, input
    cache: CacheConfig = field(default_factory=CacheConfig)  # the on-disk feature cache
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # stage 0: linear probe (reference)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)  # stage 1: the prototypes
    head: HeadConfig = field(default_factory=HeadConfig)  # stage 2: the interpretable head
    seed: int = knob(0, "seeds splits, views, initialisation and shuffling", minimum=0, maximum=SEED_MAX)
    device: str = knob("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    out: str = knob("runs/default", "output folder (checkpoint, metrics.json, figures, report)")


# Fields renamed since checkpoints were first written: old dotted name -> new dotted name.
RENAMED_FIELDS = {
    "codebook.num_codes": "codebook.num_prototypes",
    "codebook.reset_dead_codes": "codebook.reset_dead_prototypes",
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict (YAML, JSON), values coerced to the field types.

    Raises:
        ConfigError: a section is not a mapping, a field is unknown, or a value cannot be read or
            is outside its choices / bounds (the message names the dotted field).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or cls.__name__}' must be a mapping, got {data!r}")
    if cls is RunConfig:
        data = upgrade(data)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in names)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(where + k for k in unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, hint, where + name)
    return cls(**kwargs)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict with fields renamed since it was written (`RENAMED_FIELDS`) moved to their new names."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED_FIELDS.items():
        (section, old_name), (_, new_name) = old.split("."), new.split(".")
        node = data.get(section)
        if isinstance(node, dict) and old_name in node:
            if new_name in node:
                raise ConfigError(f"config has both '{old}' and its new name '{new}'; keep '{new}'")
            logger.warning("config field '%s' is now '%s'", old, new)
            node[new_name] = node.pop(old_name)
    return data


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
    """Read a RunConfig from a YAML file (missing sections keep their defaults).

    Raises:
        ConfigError: the file cannot be read, is not YAML, or has a bad field (names file and field).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {' '.join(str(err).split())}") from err
    try:
        return from_dict(RunConfig, {} if data is None else data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


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


def leaf_fields(cls: type = RunConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Map 'section.field' -> the dataclass field of every leaf (its metadata: help, choices, bounds)."""
    hints = _hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for spec in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[spec.name]):
            out.update(leaf_fields(hints[spec.name], f"{prefix}{spec.name}."))
        else:
            out[prefix + spec.name] = spec
    return out


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply {'section.field': value} overrides (values coerced to the field type).

    Raises:
        ConfigError: an unknown field, or a value that cannot be read or is out of bounds.
    """
    data = to_dict(config)
    for dotted, value in overrides.items():
        *sections, leaf = dotted.split(".")
        node = data
        for section in sections:
            if section not in node or not isinstance(node[section], dict):
                raise ConfigError(f"unknown config section in '{dotted}'")
            node = node[section]
        if leaf not in node:
            raise ConfigError(f"unknown config field '{dotted}'")
        node[leaf] = value
    return from_dict(RunConfig, data)
