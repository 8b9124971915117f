"""Stages 0 and 1 on the tiny run's cached features: frozen probe, codes-only training, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protoquant.cache.view import CacheView
from protoquant.codebook import VectorQuantizer, nearest_prototypes, to_patches
from protoquant.config import CodebookConfig, ProbeConfig
from protoquant.train.codebook import (
    better_fit,
    evaluate_quantized,
    init_codebook,
    prototype_usage,
    quantized_fit,
    quantized_logits,
    sample_patches,
    train_codebook,
)
from protoquant.train.common import accuracy, warmup_cosine
from protoquant.train.probe import evaluate_probe, train_probe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def caches(tiny_run):
    return tiny_run.result.caches


def _all_patches(subset: CacheView) -> torch.Tensor:
    return to_patches(subset.store.get(subset.entries))  # (N*H*W, D)


@pytest.fixture(scope="module")
def probe(caches):
    return train_probe(caches.train, caches.val, 3, ProbeConfig(epochs=10), seed=0, device=CPU)


def test_warmup_cosine_schedule() -> None:
    total, warmup = 50, 10
    factors = [warmup_cosine(step, total, warmup) for step in range(total + 1)]
    assert all(0.0 <= f <= 1.0 for f in factors)
    assert factors[warmup - 1] == pytest.approx(1.0) and factors[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:warmup], factors[1:warmup]))  # rising during warmup
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :]))  # decaying afterwards
    assert factors[total] == pytest.approx(0.0, abs=1e-9)
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)


def test_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert np.isnan(accuracy(logits[:0], torch.tensor([], dtype=torch.long)))


def test_probe_is_frozen_deterministic_and_best_on_validation(caches, probe) -> None:
    assert not probe.training and not any(p.requires_grad for p in probe.parameters())
    again = train_probe(caches.train, caches.val, 3, ProbeConfig(epochs=10), seed=0, device=CPU)
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)
    with torch.no_grad():
        expected = accuracy(probe(caches.val.store.pooled()[caches.val.entries]), caches.val.labels)
    assert evaluate_probe(probe, caches.val, CPU) == pytest.approx(expected)


def test_sample_patches_are_real_patches_of_the_subset(caches) -> None:
    patches = _all_patches(caches.train_plain)
    sample = sample_patches(caches.train_plain, 30, np.random.default_rng(0))
    assert sample.shape == (30, patches.shape[1])
    assert (sample[:, None] == patches[None]).all(dim=2).any(dim=1).all()  # each row is a cached patch
    assert len(torch.unique(sample, dim=0)) == 30  # drawn without replacement
    everything = sample_patches(caches.train_plain, 10**6, np.random.default_rng(0))
    assert everything.shape == patches.shape  # capped at the number of patches
    assert torch.equal(torch.unique(everything, dim=0), torch.unique(patches, dim=0))


def test_init_codebook(caches) -> None:
    kmeans = init_codebook(
        caches.train, CodebookConfig(num_prototypes=8, kmeans_patches=100, kmeans_iters=3), seed=0
    )
    assert kmeans.shape == (8, caches.train.store.channels) and torch.isfinite(kmeans).all()
    assert torch.equal(
        kmeans,
        init_codebook(
            caches.train, CodebookConfig(num_prototypes=8, kmeans_patches=100, kmeans_iters=3), seed=0
        ),
    )
    orthogonal = init_codebook(caches.train, CodebookConfig(num_prototypes=8, init="orthogonal"), seed=0)
    torch.testing.assert_close(orthogonal @ orthogonal.t(), torch.eye(8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="kmeans"):
        init_codebook(caches.train, CodebookConfig(num_prototypes=8, init="random"), seed=0)


def test_quantized_logits_are_the_probe_on_the_mean_of_codes(caches, probe) -> None:
    features = caches.val.store.get(caches.val.entries)
    quantizer = VectorQuantizer(
        torch.randn(8, features.shape[1], generator=torch.Generator().manual_seed(0))
    ).eval()
    logits, quantized = quantized_logits(quantizer, probe, features)
    indices = nearest_prototypes(to_patches(features), quantizer.codebook)  # (B*H*W,)
    expected_mean = quantizer.codebook[indices].reshape(len(features), -1, features.shape[1]).mean(dim=1)
    torch.testing.assert_close(logits, probe(expected_mean))
    assert quantized.shape == features.shape


def test_train_codebook_trains_only_the_codes(caches, probe) -> None:
    probe_before = {k: v.clone() for k, v in probe.state_dict().items()}
    config = CodebookConfig(num_prototypes=8, kmeans_patches=100, kmeans_iters=3, epochs=2, batch_size=16)
    quantizer, history = train_codebook(caches.train, caches.val, probe, config, seed=0, device=CPU)
    assert all(torch.equal(probe_before[k], v) for k, v in probe.state_dict().items())
    assert (
        quantizer.codebook.shape == (8, caches.train.store.channels)
        and torch.isfinite(quantizer.codebook).all()
    )
    assert not quantizer.training and not quantizer.codebook.requires_grad
    assert [row["epoch"] for row in history] == [0, 1]
    assert all(0 <= row["dead_prototypes"] <= 8 and 0 <= row["val_accuracy"] <= 1 for row in history)
    best = max(row["val_accuracy"] for row in history)
    assert evaluate_quantized(quantizer, probe, caches.val, 16, CPU) == pytest.approx(best)
    initial = init_codebook(caches.train, config, seed=0)
    assert not torch.equal(quantizer.codebook, initial)  # the codes did move in stage 1


def test_evaluation_does_not_count_usage(caches, probe) -> None:
    quantizer = VectorQuantizer(
        init_codebook(caches.train, CodebookConfig(num_prototypes=8, kmeans_patches=100), seed=0)
    )
    quantizer.train()
    evaluate_quantized(quantizer, probe, caches.val, 16, CPU)
    assert quantizer.usage.sum() == 0


def test_code_usage_counts_every_patch_once(caches) -> None:
    codes = torch.randn(8, caches.val.store.channels, generator=torch.Generator().manual_seed(1))
    counts = prototype_usage(codes, caches.val, 2, CPU)
    grid = caches.val.store.grid
    assert counts.sum() == len(caches.val.entries) * grid[0] * grid[1]
    expected = torch.bincount(nearest_prototypes(_all_patches(caches.val), codes), minlength=8).float()
    assert torch.equal(counts, expected)


def test_stage_1_keeps_the_best_accuracy_and_breaks_ties_on_the_validation_loss(caches, probe) -> None:
    """A small validation split ties many epochs in accuracy: the lowest loss among them is kept."""
    config = CodebookConfig(num_prototypes=8, kmeans_patches=100, kmeans_iters=3, epochs=4, batch_size=16)
    quantizer, history = train_codebook(caches.train, caches.val, probe, config, seed=0, device=CPU)
    chosen = max(history, key=lambda row: (row["val_accuracy"], -row["val_loss"]))
    accuracy, loss = quantized_fit(quantizer, probe, caches.val, 16, CPU)
    assert accuracy == pytest.approx(chosen["val_accuracy"]) and loss == pytest.approx(chosen["val_loss"])
    assert better_fit((0.5, 1.0), (0.5, 2.0)) and not better_fit((0.5, 2.0), (0.5, 1.0))
    assert better_fit((0.6, 9.0), (0.5, 1.0)) and not better_fit((0.4, 0.1), (0.5, 1.0))
