"""VectorQuantizer: nearest-code assignment, quantized maps, usage counts, initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protoquant import codebook as codebook_module
from protoquant.codebook import VectorQuantizer, kmeans_init, nearest_prototypes, orthogonal_init, to_patches


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _features(batch: int = 3, dim: int = 8, height: int = 4, width: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, dim, height, width, generator=_generator(seed))


def test_to_patches_is_location_major() -> None:
    features = _features()
    patches = to_patches(features)
    assert patches.shape == (3 * 4 * 5, 8)
    for b, h, w in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
        assert torch.equal(patches[(b * 4 + h) * 5 + w], features[b, :, h, w])


def test_nearest_codes_matches_brute_force_cosine_argmax() -> None:
    patches = torch.randn(500, 8, generator=_generator(1)) * torch.rand(500, 1, generator=_generator(2)) * 10
    codes = torch.randn(20, 8, generator=_generator(3)) * 3
    expected = F.cosine_similarity(patches[:, None, :], codes[None, :, :], dim=2).argmax(dim=1)  # (N,)
    assert torch.equal(nearest_prototypes(patches, codes), expected)


def test_nearest_codes_ignores_vector_length() -> None:
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    patches = torch.tensor([[100.0, 1.0], [0.01, 0.02], [-1.0, 3.0]])
    assert nearest_prototypes(patches, codes).tolist() == [0, 1, 1]
    assert nearest_prototypes(patches, codes * torch.tensor([[50.0], [0.1]])).tolist() == [0, 1, 1]


def test_nearest_codes_is_chunk_independent(monkeypatch) -> None:
    patches, codes = torch.randn(103, 8, generator=_generator(4)), torch.randn(7, 8, generator=_generator(5))
    whole = nearest_prototypes(patches, codes)
    monkeypatch.setattr(codebook_module, "ASSIGN_CHUNK", 10)
    assert torch.equal(nearest_prototypes(patches, codes), whole)
    assert nearest_prototypes(patches[:0], codes).shape == (0,)


def test_quantized_vectors_are_codebook_rows() -> None:
    features = _features()
    quantizer = VectorQuantizer(torch.randn(6, 8, generator=_generator(7)))
    out = quantizer(features)
    assert out.quantized.shape == features.shape and out.indices.shape == (3, 4, 5)
    for b in range(3):
        for h in range(4):
            for w in range(5):
                assert torch.equal(out.quantized[b, :, h, w], quantizer.codebook[out.indices[b, h, w]])
    expected = nearest_prototypes(to_patches(features), quantizer.codebook).reshape(3, 4, 5)
    assert torch.equal(out.indices, expected)


def test_gradients_reach_only_the_used_codes() -> None:
    features = _features()
    quantizer = VectorQuantizer(torch.randn(40, 8, generator=_generator(8)))
    out = quantizer(features)
    (out.quantized - features).pow(2).mean().backward()
    used = torch.zeros(40, dtype=torch.bool)
    used[out.indices.unique()] = True
    grad_norm = quantizer.codebook.grad.norm(dim=1)
    assert (grad_norm[used] > 0).all() and (grad_norm[~used] == 0).all()


def test_usage_counts_only_in_training_mode_and_sum_to_patches() -> None:
    features = _features()
    quantizer = VectorQuantizer(torch.randn(6, 8, generator=_generator(9)))
    quantizer.eval()
    quantizer(features)
    assert quantizer.usage.sum() == 0
    quantizer.train()
    out = quantizer(features)
    assert quantizer.usage.sum() == features.shape[0] * features.shape[2] * features.shape[3]
    assert torch.equal(quantizer.usage, torch.bincount(out.indices.flatten(), minlength=6).float())
    quantizer(features)
    assert quantizer.usage.sum() == 2 * 3 * 4 * 5
    assert "usage" in quantizer.state_dict()


def test_orthogonal_init_rows_are_orthonormal_when_k_le_d() -> None:
    for num_prototypes, dim in [(8, 8), (5, 16)]:
        codes = orthogonal_init(num_prototypes, dim, _generator())
        assert codes.shape == (num_prototypes, dim)
        torch.testing.assert_close(codes @ codes.t(), torch.eye(num_prototypes), atol=1e-5, rtol=0)


def test_orthogonal_init_columns_are_orthonormal_when_k_gt_d() -> None:
    codes = orthogonal_init(20, 6, _generator())
    assert codes.shape == (20, 6)
    torch.testing.assert_close(codes.t() @ codes, torch.eye(6), atol=1e-5, rtol=0)


def test_orthogonal_init_is_seeded() -> None:
    assert torch.equal(orthogonal_init(5, 16, _generator(1)), orthogonal_init(5, 16, _generator(1)))
    assert not torch.equal(orthogonal_init(5, 16, _generator(1)), orthogonal_init(5, 16, _generator(2)))


def test_kmeans_returns_k_finite_centroids_and_is_seeded() -> None:
    patches = torch.randn(300, 8, generator=_generator(10))
    centroids = kmeans_init(patches, 12, 5, _generator(11))
    assert centroids.shape == (12, 8) and torch.isfinite(centroids).all()
    assert torch.equal(centroids, kmeans_init(patches, 12, 5, _generator(11)))


def test_kmeans_finds_separated_clusters() -> None:
    directions = torch.eye(4) * 5  # four well-separated directions
    labels = torch.arange(200) % 4
    patches = directions[labels] + 0.05 * torch.randn(200, 4, generator=_generator(12))
    centroids = kmeans_init(patches, 4, 10, _generator(13))
    assignment = nearest_prototypes(patches, centroids)
    # every cluster maps to exactly one centroid and vice versa
    pairs = set(zip(labels.tolist(), assignment.tolist()))
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4
    for label, code in pairs:
        torch.testing.assert_close(centroids[code], patches[labels == label].mean(0))


def test_kmeans_handles_duplicate_points_and_empty_clusters() -> None:
    distinct = torch.randn(3, 8, generator=_generator(14))
    patches = distinct.repeat_interleave(30, dim=0)  # (90, 8): only 3 distinct points
    centroids = kmeans_init(patches, 10, 5, _generator(15))
    assert centroids.shape == (10, 8) and torch.isfinite(centroids).all()
    # every centroid is a data point (empty clusters are re-seeded from patches, never left at zero)
    distance = torch.cdist(centroids, distinct).amin(dim=1)
    assert (distance < 1e-5).all()


def test_kmeans_with_exactly_k_points_keeps_them() -> None:
    patches = torch.randn(6, 8, generator=_generator(16))
    centroids = kmeans_init(patches, 6, 3, _generator(17))
    assert torch.cdist(centroids, patches).amin(dim=1).max() < 1e-5


def test_kmeans_needs_at_least_k_patches() -> None:
    with pytest.raises(ValueError, match="K=10"):
        kmeans_init(torch.randn(5, 8), 10, 3, _generator())
