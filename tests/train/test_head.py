"""Stage 2 on fixed pooled scores: frozen codes, selection on validation, top-k limit."""

from __future__ import annotations

import pytest
import torch

from protoquant.config import HeadConfig
from protoquant.head import NonNegativeLinear, ProtoQuantHead
from protoquant.train.common import accuracy
from protoquant.train.head import compute_scores, evaluate_head, fit_class_layer, global_size, train_head

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def caches(tiny_run):
    return tiny_run.result.caches


@pytest.fixture(scope="module")
def codes(tiny_run) -> torch.Tensor:
    return tiny_run.stage1_codes


def _train(codes, caches, **config) -> tuple[ProtoQuantHead, dict]:
    usage = torch.arange(len(codes), dtype=torch.float32)
    return train_head(
        codes, usage, caches.train, caches.val, 3, HeadConfig(**{"epochs": 5, **config}), seed=0, device=CPU
    )


def test_compute_scores_are_the_head_scores(codes, caches) -> None:
    head = ProtoQuantHead(codes, 3)
    scores = compute_scores(head, caches.val, 2, CPU)
    assert scores.shape == (len(caches.val.entries), len(codes))
    torch.testing.assert_close(scores, head.scores(caches.val.store.get(caches.val.entries)))


def test_float16_scores_halve_the_memory_and_train_the_same_head(codes, caches) -> None:
    head = ProtoQuantHead(codes, 3)
    full = compute_scores(head, caches.train, 4, CPU)
    half = compute_scores(head, caches.train, 4, CPU, torch.float16)
    assert half.dtype == torch.float16 and half.element_size() * 2 == full.element_size()
    torch.testing.assert_close(half.float(), full, rtol=1e-3, atol=1e-4)  # fp16: 11-bit mantissa
    reference, _ = _train(codes, caches)
    compact, _ = _train(codes, caches, scores_dtype="float16")
    torch.testing.assert_close(compact.class_weights, reference.class_weights, rtol=0, atol=2e-3)


def test_unknown_scores_dtype_names_the_field(codes, caches) -> None:
    with pytest.raises(ValueError, match="head.scores_dtype"):
        _train(codes, caches, scores_dtype="int8")


def test_fit_class_layer_keeps_the_best_validation_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = torch.rand(40, 6, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    x_val, y_val = torch.rand(10, 6, generator=generator), torch.randint(0, 3, (10,), generator=generator)
    torch.manual_seed(0)
    layer = NonNegativeLinear(6, 3)
    best = fit_class_layer(
        layer, (x_train, y_train), (x_val, y_val), lr=0.1, epochs=8, config=HeadConfig(batch_size=8), seed=0
    )
    with torch.no_grad():
        assert accuracy(layer(x_val), y_val) == pytest.approx(best)
    assert (layer.effective_weight >= 0).all()


def test_train_head_keeps_the_codebook_frozen(codes, caches) -> None:
    head, _ = _train(codes, caches)
    assert torch.equal(head.codebook, codes)
    assert not any(p.requires_grad for p in head.parameters())
    assert all(param is not head.codebook for param in head.parameters())
    assert torch.equal(head.usage, torch.arange(len(codes), dtype=torch.float32))
    assert (head.class_weights >= 0).all() and not head.training


def test_train_head_selects_on_validation(codes, caches) -> None:
    head, selection = _train(codes, caches, temperature_grid=(0.05, 0.5), lr_grid=(0.01, 0.2))
    trials = selection["trials"]
    assert {(t["temperature"], t["lr"]) for t in trials} == {
        (0.05, 0.01),
        (0.05, 0.2),
        (0.5, 0.01),
        (0.5, 0.2),
    }
    best = max(trials, key=lambda t: t["val_accuracy"])
    assert selection["val_accuracy"] == best["val_accuracy"]
    assert head.temperature == selection["temperature"]
    assert any(
        t["temperature"] == selection["temperature"]
        and t["lr"] == selection["lr"]
        and t["val_accuracy"] == best["val_accuracy"]
        for t in trials
    )
    assert evaluate_head(head, caches.val, 4, CPU) == pytest.approx(selection["val_accuracy"])


def test_train_head_is_seeded(codes, caches) -> None:
    first, _ = _train(codes, caches)
    second, _ = _train(codes, caches)
    assert torch.equal(first.class_layer.weight, second.class_layer.weight)


@pytest.mark.parametrize("k", [1, 4])
def test_top_k_per_class_limits_every_class(codes, caches, k) -> None:
    # no fallback: the cut must stand even where this tiny validation split prefers a larger k
    head, selection = _train(codes, caches, top_k_per_class=k, top_k_fallback=(), top_k_epochs=3)
    assert selection["top_k"] == k
    assert ((head.class_weights > 0).sum(dim=1) <= k).all()
    assert ((head.class_layer.mask == 1).sum(dim=1) == k).all()
    assert evaluate_head(head, caches.val, 4, CPU) == pytest.approx(selection["val_accuracy"])


def test_global_size_counts_prototypes_used_by_some_class(codes) -> None:
    head = ProtoQuantHead(codes, 3)
    with torch.no_grad():
        head.class_layer.weight.zero_()
        head.class_layer.weight[0, 0] = 0.5
        head.class_layer.weight[1, 0] = 0.7
        head.class_layer.weight[2, 3] = 1e-4
        head.class_layer.weight[2, 5] = -3.0
    assert global_size(head, 1e-3) == 1
    assert global_size(head, 1e-5) == 2
