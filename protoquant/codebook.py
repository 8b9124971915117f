"""The codebook: prototypes learned by vector quantization of frozen patch features.

Each patch feature is assigned its nearest prototype by cosine similarity; the quantized
map holds the raw prototype vectors. Usage counts live in a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from protoquant import progress

ASSIGN_CHUNK = 16_384  # patches per chunk when assigning large sets (bounds memory)


def nearest_prototypes(patches: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar prototype for each patch.

    Args:
        patches: (N, D). codebook: (K, D).

    Returns:
        (N,) int64 indices.
    """
    unit_codes = F.normalize(codebook, dim=1)  # (K, D)
    out = []
    for chunk in patches.split(ASSIGN_CHUNK):
        out.append((F.normalize(chunk, dim=1) @ unit_codes.t()).argmax(dim=1))  # (n, K) -> (n,)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=patches.device)


def to_patches(features: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


@dataclass(frozen=True)
class QuantizeOutput:
    quantized: torch.Tensor  # (B, D, H, W) prototype vectors in place of features
    indices: torch.Tensor  # (B, H, W) prototype index per location


class VectorQuantizer(nn.Module):
    """K trainable prototypes in R^D with assignment-usage counts."""

    def __init__(self, codebook: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone())  # (K, D)
        self.register_buffer("usage", torch.zeros(codebook.shape[0]))  # (K,) assignments counted in training

    @property
    def num_prototypes(self) -> int:
        return int(self.codebook.shape[0])

    def forward(self, features: torch.Tensor) -> QuantizeOutput:
        batch, _, height, width = features.shape
        with torch.no_grad():
            indices = nearest_prototypes(to_patches(features), self.codebook)  # (B*H*W,)
            if self.training:
                # index_add_, not bincount: CUDA's bincount reads the largest index back to the
                # host, a synchronisation at every training step
                self.usage.index_add_(0, indices, torch.ones_like(indices, dtype=self.usage.dtype))
        quantized = self.codebook[indices]  # (B*H*W, D), gradients flow to the prototypes
        quantized = quantized.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, D, H, W)
        return QuantizeOutput(quantized, indices.reshape(batch, height, width))


def orthogonal_init(num_prototypes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(K, D) random (semi-)orthogonal rows: the reference code's initialisation."""
    codebook = torch.empty(num_prototypes, dim)
    gaussian = torch.randn(max(num_prototypes, dim), min(num_prototypes, dim), generator=generator)
    q, r = torch.linalg.qr(gaussian)  # orthonormal columns
    q = q * torch.sign(torch.diagonal(r))  # (max, min)
    codebook.copy_(q if num_prototypes >= dim else q.t())
    return codebook


def kmeans_init(
    patches: torch.Tensor, num_prototypes: int, iters: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means with cosine assignment and mean update, seeded from random patches.

    Empty clusters are re-seeded with random patches each iteration.

    Args:
        patches: (N, D) training patch features, N >= num_prototypes.

    Returns:
        (K, D) centroids (raw feature scale, not normalised).
    """
    if len(patches) < num_prototypes:
        raise ValueError(f"k-means needs at least K={num_prototypes} patches, got {len(patches)}")
    centroids = patches[torch.randperm(len(patches), generator=generator)[:num_prototypes]].clone()
    for _ in progress.bar(range(iters), desc=f"k-means init (K={num_prototypes})", unit="iter"):
        assignment = nearest_prototypes(patches, centroids)  # (N,)
        counts = torch.bincount(assignment, minlength=num_prototypes).to(patches.dtype)  # (K,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, patches)  # (K, D)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            reseed = torch.randint(len(patches), (int(empty.sum()),), generator=generator)
            centroids[empty] = patches[reseed]
    return centroids
