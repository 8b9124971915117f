"""The config sections: one frozen dataclass per step of the data flow, the paper's values as defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from protoquant.errors import ConfigError
from protoquant.knobs import Checked, knob

Interpolation = Literal["", "nearest", "bilinear", "bicubic"]  # '' = the model's pretrained one
PrototypeInit = Literal["kmeans", "orthogonal"]
ScoresDtype = Literal["float32", "float16"]
DecodeSite = Literal["auto", "workers", "device"]
ResidentMode = Literal["auto", "device", "stream"]
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
    stages: tuple[int, ...] = knob(
        (),
        "combine the maps of these feature-pyramid stages (2 or more, e.g. 2,3): each L2-normalised per "
        "cell, resized to the finest listed grid and concatenated along channels; empty = backbone.stage alone",
        minimum=0,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.stages) == 1 or len(set(self.stages)) != len(self.stages):
            raise ConfigError(
                f"config field 'backbone.stages' needs 2 or more distinct stages (or none), got {self.stages}"
            )
        if self.stages and self.stage != -1:
            raise ConfigError(
                "config fields 'backbone.stage' and 'backbone.stages': set one of them, not both"
            )
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
    decode: DecodeSite = knob(
        "auto",
        "where JPEG files are decoded and resized: 'workers' (PIL in the DataLoader workers), 'device' "
        "(the workers read the bytes; torchvision decodes, resizes and crops them on the run's device in "
        "batches: nvJPEG on CUDA), 'auto' ('device' on CUDA, else 'workers'); other formats always "
        "decode in the workers",
    )
    resident: ResidentMode = knob(
        "auto",
        "how stages 1 and 2 read the training maps: 'device' (loaded into the run device's memory once), "
        "'stream' (each batch read from the memory-mapped shards), 'auto' ('device' on CUDA when they "
        "fit in free GPU memory with resident_margin to spare, else 'stream', with batches prefetched "
        "from pinned memory on a side stream on CUDA)",
    )
    resident_margin: float = knob(
        0.2,
        "share of free GPU memory kept free when resident = 'auto' loads the maps",
        minimum=0.0,
        maximum=0.9,
    )


@dataclass(frozen=True)
class FinetuneConfig(Checked):
    """Stage -1 (optional): fine-tune the backbone on the training split before it is frozen."""

    section = "finetune."

    enabled: bool = knob(False, "train: fine-tune the backbone first and use the fine-tuned weights frozen")
    out: str = knob(
        "",
        "folder of the fine-tuned weights; '' = <cache root>/finetune/<key>, the key hashing the data, "
        "the backbone and this section (so an identical fine-tuning is reused, an interrupted one resumed)",
    )
    image_size: int = knob(
        0,
        "input side S while fine-tuning; 0 = backbone.image_size. A smaller side trains faster (the "
        "work grows with S^2) and convolutional backbones then read the weights at backbone.image_size "
        "(e.g. fine-tune at 224, cache at 448 for a finer grid); keep it equal for ViTs",
        minimum=0,
    )
    epochs: int = knob(30, "passes over the training images", minimum=1)
    lr: float = knob(1e-4, "AdamW learning rate of the backbone (the new classifier gets head_lr)", above=0.0)
    head_lr: float = knob(1e-3, "AdamW learning rate of the new linear classifier", above=0.0)
    weight_decay: float = knob(0.05, "AdamW weight decay (not on norms and biases)", minimum=0.0)
    warmup_epochs: float = knob(2.0, "linear warm-up before the cosine decay", minimum=0.0)
    label_smoothing: float = knob(0.1, "label smoothing of the targets", minimum=0.0, maximum=0.5)
    mixup_alpha: float = knob(0.8, "timm Mixup alpha; 0 = off", minimum=0.0)
    cutmix_alpha: float = knob(1.0, "timm CutMix alpha; 0 = off", minimum=0.0)
    mix_prob: float = knob(1.0, "probability a batch is mixed (Mixup or CutMix)", minimum=0.0, maximum=1.0)
    batch_size: int = knob(
        32, "images per step over all processes (divisible by them; per process even when mixing)", minimum=2
    )
    patience: int = knob(
        5,
        "early stopping: stop after this many epochs without a better validation accuracy (needs validation "
        "images); 0 = off. The best epoch's weights are kept either way",
        minimum=0,
    )
    amp: bool = knob(True, "mixed precision on CUDA (bf16 where supported, else fp16); CPU runs in fp32")
    num_workers: int = knob(-1, "DataLoader workers; -1: one per CPU (per local rank), up to 16", minimum=-1)


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
    scores_memory_mb: int = knob(
        4096,
        "stage 2 keeps the fixed (N, K) training scores in memory up to this many MiB per process; "
        "larger ones are written to a scratch file beside the feature cache and read back batch by "
        "batch, so memory stays bounded whatever N",
        minimum=1,
    )


@dataclass(frozen=True)
class RunConfig(Checked):
    """One run: a section per step of the data flow, then the run-wide fields."""

    section = ""

    data: DataConfig = field(default_factory=DataConfig)  # dataset, folder and splits
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # frozen backbone, weights, input
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # stage -1: optional fine-tuning
    cache: CacheConfig = field(default_factory=CacheConfig)  # the on-disk feature cache
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # stage 0: linear probe (reference)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)  # stage 1: the prototypes
    head: HeadConfig = field(default_factory=HeadConfig)  # stage 2: the interpretable head
    seed: int = knob(0, "seeds splits, views, initialisation and shuffling", minimum=0, maximum=SEED_MAX)
    device: str = knob("auto", "'auto', 'cpu', 'cuda', 'cuda:1', ...")
    out: str = knob("runs/default", "output folder (checkpoint, metrics.json, figures, report)")
