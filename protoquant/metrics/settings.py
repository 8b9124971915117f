"""Every protocol knob of the metrics, with the published value as its default (see METRICS.md).

Pixel sizes are given for 224 x 224 inputs, as in the papers; runners scale them to the model's
input size and record the value used. `MetricSettings` is what a run records in its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protoquant.config import WEIGHT_THRESHOLD  # a weight or score x weight counts if it exceeds this

REFERENCE_SIZE = 224  # input side the published protocols use

# Explanation size (PIP-Net)

PER_CLASS_THRESHOLD = 0.1  # per-class size counts weights w[c, p] above this

# Consistency and stability (Huang et al., ICCV 2023)
PROTOTYPES_PER_CLASS = 10  # shared prototypes: "prototypes of class c" = its top-10 by weight
CONSISTENCY_THRESHOLD = 0.8  # consistent iff max_k freq[k] >= this
BOX_HALF_SIZE = 36  # box = argmax +- 36 px at 224 (73 px, both ends inclusive)
NOISE_STD = 0.2  # stability noise ~ N(0, 0.2^2) in normalised input space
NOISE_CLIP = 0.25  # ... clipped to [-0.25, 0.25]

# Part purity (PIP-Net, CVPR 2023)
PURITY_WEIGHT_THRESHOLD = 1e-5  # prototypes counted: max_c w[c, p] > this
PURITY_PATCH = 32  # patch side at 224 around the argmax latent cell
PURITY_TOP_K = 10  # top-k variant: the k images with the highest pooled score
PURITY_SCORE_THRESHOLD = 0.5  # all@0.5 variant: every image with pooled score > this
PURE = 0.5  # prototypes with purity above this are reported as a count

# Spatial misalignment (Sacha et al., AAAI 2024)
ATTACK_EPSILON = 0.4  # L-inf budget in normalised input space
ATTACK_STEP = 0.01  # PGD step
ATTACK_ITERATIONS = 40
MASK_QUANTILE = 0.95  # frozen box covers pixels >= this quantile of the target's bicubic map
MASK_GROW = 10  # ... grown by this many pixels (at 224)
LOCATION_QUANTILE = 0.9  # PLC compares regions strictly above this quantile (bilinear maps)

# FunnyBirds (Hesse et al., ICCV 2023)
FB_THRESHOLD_RANGE = (0.01, 0.5)  # importance thresholds t: linspace over this range ...
FB_THRESHOLD_COUNT = 80  # ... with this many values
FB_LOGIT_FRACTION = 0.05  # a removal matters if it lowers the target logit by >= 5 %
FB_DILATION = 5  # part masks are dilated by a 5 x 5 max-pool
FB_TS_DISTANCE = 3  # target sensitivity: classes this many parts away from the target
BOX_VARIANT_QUANTILE = 0.95  # box attribution: each prototype's box at this quantile

# Grounding audit (ProtoQuant's own claim)
DUPLICATE_COSINE = 0.99  # two prototypes with cosine >= this are near-duplicates


def fb_thresholds() -> np.ndarray:
    """(T,) the FunnyBirds importance thresholds, linspace(0.01, 0.5, 80)."""
    return np.linspace(*FB_THRESHOLD_RANGE, num=FB_THRESHOLD_COUNT)


def scaled(pixels: int, image_size: int) -> int:
    """A pixel length given at 224, rounded to the model's input size (unchanged at 224)."""
    return int(round(pixels * image_size / REFERENCE_SIZE))


@dataclass(frozen=True)
class MetricSettings:
    """Protocol settings of one evaluation run; recorded verbatim in the output."""

    seed: int = 0  # noise, random starts
    batch_size: int = 32  # images or cached entries per batch
    prototypes_per_class: int = PROTOTYPES_PER_CLASS
    size_threshold: float = WEIGHT_THRESHOLD
    per_class_threshold: float = PER_CLASS_THRESHOLD
    consistency_threshold: float = CONSISTENCY_THRESHOLD
    box_half_size: int = BOX_HALF_SIZE  # at 224
    noise_std: float = NOISE_STD
    noise_clip: float = NOISE_CLIP
    purity_weight_threshold: float = PURITY_WEIGHT_THRESHOLD
    purity_patch: int = PURITY_PATCH  # in model-input pixels (not scaled: PIP-Net uses 32 for any grid)
    purity_top_k: int = PURITY_TOP_K
    purity_score_threshold: float = PURITY_SCORE_THRESHOLD
    attack_epsilon: float = ATTACK_EPSILON
    attack_step: float = ATTACK_STEP
    attack_iterations: int = ATTACK_ITERATIONS
    random_start_only: bool = False  # True reproduces the published attack (zero gradient)
    # "top": the most activated prototype; "class": the true class's prototypes attacked jointly
    # (the reference); "class_each": one attack per class prototype (ProtoQuant's variant)
    attack_target: str = "top"
    mask_grow: int = MASK_GROW  # at 224
    # attack rows (images x targets) per PGD batch; 0 = batch_size ("class_each" makes up to
    # prototypes_per_class rows per image: they are chunked, so memory stays that of one batch).
    # 16 bounds the attack's memory whatever batch_size: about 80 MB a row for MobileNetV2 at
    # 224 px (input gradients through the backbone), so about 1.3 GB
    attack_batch_size: int = 16
    # Samples. The published misalignment, stability and FunnyBirds protocols average over the
    # whole test split (FunnyBirds' framework evaluates all test images unless told `nr_itrs`),
    # so each default is 0 = all images; n > 0 evaluates a sample of n, chosen by `sample_rule`
    # and recorded in the protocol output (each protocol logs its cost before it starts).
    misalignment_images: int = 0  # 0 = all images of the split; else a sample of n (sample_rule)
    funnybirds_images: int = 0  # 0 = all images of the split; else a sample of n (sample_rule)
    stability_images: int = 0  # 0 = all images of the split; else a sample of n (sample_rule)
    # "stratified": seeded (seed), class-stratified (splits ordered by class, as CUB's, stay
    # balanced); "first": the first n images, as the FunnyBirds framework's nr_itrs
    sample_rule: str = "stratified"
    funnybirds_attribution: str = "similarity"  # "similarity" maps (METRICS.md), "activation" maps or "box"
    # upsampling of the FunnyBirds attribution maps: "bicubic" (OpenCV-exact, as the part-prototype
    # protocols) or "bilinear" (the FunnyBirds framework's default); recorded in the output
    funnybirds_upsampling: str = "bicubic"
    fb_logit_fraction: float = FB_LOGIT_FRACTION
    duplicate_cosine: float = DUPLICATE_COSINE
