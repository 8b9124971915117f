"""The interpretable head: similarity to prototypes -> softmax(tau) -> max-pool -> non-negative class layer.

Shapes: features (B, D, H, W), codebook (K, D), similarity/activation (B, K, H, W),
scores (B, K), class_weights (C, K), logits (B, C).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from protoquant.head_fast import (
    FastPathState,
    HeadScores,
    compile_prerequisite_missing,
    effective_weight,
    pooled_scores,
    scaled_unit_codes,
)

logger = logging.getLogger(__name__)


def cosine_similarity_map(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every location to every prototype.

    Computed as one (B, H*W, D) @ (D, K) matrix product with prototypes last, so the
    softmax over prototypes and the spatial max read contiguous memory; channels-last
    features (what the backbones return) are flattened without a copy.

    Args:
        features: (B, D, H, W) patch features.
        codebook: (K, D) prototypes.

    Returns:
        (B, K, H, W) similarities in [-1, 1] (a view of a (B, H, W, K) tensor).
    """
    return similarity_to_unit_codes(features, F.normalize(codebook, dim=1))


def similarity_to_unit_codes(features: torch.Tensor, unit_prototypes: torch.Tensor) -> torch.Tensor:
    """cosine_similarity_map for prototypes already normalised to unit length, (K, D)."""
    batch, channels, height, width = features.shape
    patches = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, D)
    similarity = F.normalize(patches, dim=2) @ unit_prototypes.t()  # (B, HW, K)
    return similarity.view(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, K, H, W)


def presence_scores(similarity: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over prototypes at each location, then max over locations.

    Returns:
        activation (B, K, H, W) and scores (B, K) = activation's spatial max.
    """
    # (B, H, W, K): contiguous when the similarity comes from cosine_similarity_map
    prototypes_last = similarity.permute(0, 2, 3, 1)
    activation = torch.softmax(prototypes_last / temperature, dim=3)  # (B, H, W, K)
    scores = activation.flatten(1, 2).amax(dim=1)  # (B, K)
    return activation.permute(0, 3, 1, 2), scores


class NonNegativeLinear(nn.Module):
    """Linear map without bias whose effective weights are ReLU(raw) * mask >= 0.

    `mask` (C, K) holds 1 where a weight may be non-zero (the top-k-per-class limit). The
    initial weights are drawn from `generator` (the global generator when None).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init_mean: float = 1.0,
        init_std: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        weight = torch.empty(out_features, in_features).normal_(init_mean, init_std, generator=generator)
        self.weight = nn.Parameter(weight)
        self.register_buffer("mask", torch.ones(out_features, in_features))

    @property
    def effective_weight(self) -> torch.Tensor:
        """(C, K) weights as used in the forward pass, all >= 0."""
        return effective_weight(self.weight, self.mask)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores @ self.effective_weight.t()  # (B, K) @ (K, C) -> (B, C)


@dataclass(frozen=True)
class HeadOutput:
    """Everything one forward pass of the head produces (all fields always filled)."""

    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor  # (B, K) pooled presence of each prototype
    similarity: torch.Tensor  # (B, K, H, W) cosine similarity to each prototype
    activation: torch.Tensor  # (B, K, H, W) softmax over prototypes of similarity / tau


class ProtoQuantHead(nn.Module):
    """Prototypes (a frozen codebook) and the non-negative class layer over their pooled presence.

    The class weights start from N(init_mean, init_std^2) drawn from `generator` (global when None).
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        num_classes: int,
        *,
        temperature: float = 0.1,
        init_mean: float = 1.0,
        init_std: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.register_buffer(
            "codebook", codebook.detach().clone()
        )  # (K, D), frozen: a buffer, never a parameter
        self.register_buffer(
            "usage", torch.zeros(codebook.shape[0])
        )  # (K,) training patches assigned to each prototype
        self.temperature = float(temperature)
        self.class_layer = NonNegativeLinear(
            codebook.shape[0], num_classes, init_mean=init_mean, init_std=init_std, generator=generator
        )
        self._fast = FastPathState()  # the logits path's reuse scope and compiled function; not saved

    @property
    def num_prototypes(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def class_weights(self) -> torch.Tensor:
        """(C, K) effective, non-negative class weights."""
        return self.class_layer.effective_weight

    @property
    def unit_prototypes(self) -> torch.Tensor:
        """(K, D) prototypes normalised to unit length (recomputed from the codebook at every call)."""
        return F.normalize(self.codebook, dim=1)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K) pooled prototype presence for features (B, D, H, W)."""
        return presence_scores(similarity_to_unit_codes(features, self.unit_prototypes), self.temperature)[1]

    def forward(self, features: torch.Tensor) -> HeadOutput:
        similarity = similarity_to_unit_codes(features, self.unit_prototypes)
        activation, scores = presence_scores(similarity, self.temperature)
        return HeadOutput(self.class_layer(scores), scores, similarity, activation)

    def contributions(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, C, K) score x weight; summing over K gives the logits."""
        return scores[:, None, :] * self.class_weights[None]

    def normaliser_codebook(self) -> torch.Tensor | None:
        """(R, D) prototypes that enter only the softmax normaliser; None for a plain head."""
        return None

    def forward_logits(self, features: torch.Tensor) -> HeadScores:
        """Logits (B, C) and scores (B, K) for features (B, D, H, W), without the (B, K, H, W) maps.

        The same values as `forward(features)` to float rounding (see `protoquant.head_fast`);
        gradients flow as through `forward`. Reuses the derived tensors inside `inference()`; after
        `compile_logits` runs as one compiled function that derives them from the live tensors.
        """
        codebook, removed = self.codebook, self.normaliser_codebook()
        weight, mask = self.class_layer.weight, self.class_layer.mask
        compiled = self._fast.compiled(features.device)
        if compiled is not None:
            return HeadScores(*compiled(features, codebook, weight, mask, self.temperature, removed))

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            codes = codebook if removed is None else torch.cat([codebook, removed])  # (K + R, D)
            return scaled_unit_codes(codes, self.temperature), effective_weight(weight, mask).t()

        sources = (codebook, weight, mask) if removed is None else (codebook, removed, weight, mask)
        codes, weight_t = self._fast.derived.get(sources, (self.temperature,), build)
        scores = pooled_scores(features, codes, self.num_prototypes)
        return HeadScores(scores @ weight_t, scores)  # (B, K) @ (K, C) -> (B, C)

    @contextmanager
    def inference(self) -> Iterator[ProtoQuantHead]:
        """Scope in which `forward_logits` reuses the scaled prototypes and effective class weights.

        They are recomputed whenever the codebook, class weights, mask or temperature change (in
        place, by `load_state_dict`, `.to`, reassignment or `.data = ...`); writing in place through
        a `.data` alias is not seen, so do not edit the head that way inside the scope.
        """
        self._fast.derived.enter()
        try:
            yield self
        finally:
            self._fast.derived.exit()

    def compile_logits(self, mode: str | None = "reduce-overhead", *, on_cpu: bool = False) -> bool:
        """Run `forward_logits` as one `torch.compile`d function; returns whether it will (None: eager).

        On the CPU the head stays eager unless `on_cpu`: the matrix product dominates there and
        compiling measured no consistent gain (BENCHMARKS.md, inference). Where torch.compile lacks a C++
        compiler (CPU) or Triton (CUDA) a warning says so and the head stays eager. Compiled lazily
        per device type at the first call. Modes: `protoquant.head_fast.COMPILE_MODES`
        ("reduce-overhead" captures CUDA graphs on CUDA).
        """
        self._fast.set_mode(mode)  # checks the mode
        device = self.codebook.device
        missing = compile_prerequisite_missing(device) if mode is not None else ""
        if mode is not None and not missing and device.type == "cpu" and not on_cpu:
            missing = "compiling measured no consistent gain there; on_cpu=True compiles anyway"
        if missing:
            logger.warning("head not compiled on %s: %s", device, missing)
            self._fast.set_mode(None)
        return self._fast.mode is not None
