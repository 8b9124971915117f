"""A head whose removed prototypes still take their share of the softmax normaliser.

The head's presence of prototype k at a location is exp(s_k / tau) / sum_j exp(s_j / tau) over
every prototype j. Dropping a prototype that no class weighs therefore raises the presence of all
the others, and with it every logit. `PrunedHead` keeps such prototypes out of the explanation
(no score, no weight, no heatmap: K shrinks for everything downstream) but still adds their
exp(s_j / tau) to the normaliser, so every logit stays what it was before the removal.

Shapes: features (B, D, H, W), codebook (K, D) explained prototypes, removed_codebook (R, D)
normaliser-only prototypes, similarity / activation (B, K, H, W), scores (B, K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protoquant.head import HeadOutput, ProtoQuantHead, presence_scores, similarity_to_unit_codes


class PrunedHead(ProtoQuantHead):
    """`ProtoQuantHead` over K explained prototypes plus R normaliser-only prototypes."""

    def __init__(
        self,
        codebook: torch.Tensor,
        removed_codebook: torch.Tensor,
        num_classes: int,
        *,
        temperature: float = 0.1,
        init_mean: float = 1.0,
        init_std: float = 0.1,
    ):
        super().__init__(
            codebook, num_classes, temperature=temperature, init_mean=init_mean, init_std=init_std
        )
        if removed_codebook.ndim != 2 or removed_codebook.shape[1] != codebook.shape[1]:
            raise ValueError(
                f"removed_codebook must be (R, {codebook.shape[1]}), got {tuple(removed_codebook.shape)}"
            )
        self.register_buffer("removed_codebook", removed_codebook.detach().clone())  # (R, D), frozen

    @property
    def num_removed(self) -> int:
        """R: prototypes that only enter the softmax normaliser."""
        return int(self.removed_codebook.shape[0])

    @property
    def all_unit_prototypes(self) -> torch.Tensor:
        """(K + R, D) unit prototypes: the explained ones first, then the normaliser-only ones."""
        return F.normalize(torch.cat([self.codebook, self.removed_codebook]), dim=1)

    def normaliser_codebook(self) -> torch.Tensor:
        """(R, D) the removed prototypes: in the softmax normaliser, out of the explanation."""
        return self.removed_codebook

    def _presence(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(similarity, activation, scores) of the K explained prototypes; the softmax runs over K + R."""
        keep = self.num_prototypes
        similarity = similarity_to_unit_codes(features, self.all_unit_prototypes)  # (B, K + R, H, W)
        activation, scores = presence_scores(similarity, self.temperature)
        return similarity[:, :keep], activation[:, :keep], scores[:, :keep]

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K) pooled presence for features (B, D, H, W), normalised over all K + R prototypes."""
        return self._presence(features)[2]

    def forward(self, features: torch.Tensor) -> HeadOutput:
        similarity, activation, scores = self._presence(features)
        return HeadOutput(self.class_layer(scores), scores, similarity, activation)
