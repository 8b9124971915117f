"""The one function that turns normalised images into the patch features a model sees.

Caching, inference (`ProtoQuant.features`: predict, explain, galleries) and every metric call
`patch_features`, so each option of `CacheConfig` that shapes the features (bf16 autocast, grid
pooling, float16 storage precision) applies to all of them alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protoquant.backbones.frozen import FrozenBackbone
from protoquant.config import CacheConfig

STORAGE_DTYPE = torch.float16  # the precision of cached features, and so of every feature map


def patch_features(
    backbone: FrozenBackbone,
    images: torch.Tensor,
    config: CacheConfig,
    *,
    input_gradients: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, 3, S, S) normalised images -> (B, D, H', W') features exactly as the cache stores them.

    The backbone runs in channels-last memory format, under bf16 autocast when
    `config.autocast_bf16`; the map is average-pooled by `config.grid_pool` (ceil mode) and
    rounded to float16, then returned as `dtype` (default: float32, float64 for float64 images).
    With `input_gradients` autograd reaches `images` (never the frozen parameters) and the
    float16 rounding is left out, so the gradients are those of the function computed.
    """
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=config.autocast_bf16):
        features = backbone(images, input_gradients=input_gradients)  # (B, D, H, W)
    if features.dtype != torch.float64:
        features = features.float()
    if config.grid_pool > 1:
        features = F.avg_pool2d(features, config.grid_pool, ceil_mode=True)  # (B, D, H/p, W/p)
    out_dtype = dtype or features.dtype
    return features.to(out_dtype) if input_gradients else features.to(STORAGE_DTYPE).to(out_dtype)
