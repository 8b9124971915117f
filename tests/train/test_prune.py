"""Compact stage 2: top-k by class margin, usage pruning, selection on validation only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from protoquant.config import HeadConfig
from protoquant.explain.explanation import explain_prediction
from protoquant.head import NonNegativeLinear, ProtoQuantHead
from protoquant.metrics.size import top_shares
from protoquant.model import ProtoQuant
from protoquant.train.head import compute_scores, fit_class_layer, limit_top_k, train_head, validation_fit
from protoquant.train.prune import class_margin_priority, part_coverage, prune_by_usage, usage_keep

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def caches(tiny_run):
    return tiny_run.result.caches


def _train(codes, usage, caches, **config) -> tuple[ProtoQuantHead, dict]:
    head_config = HeadConfig(**{"epochs": 5, "top_k_epochs": 5, **config})
    return train_head(codes, usage, caches.train, caches.val, 3, head_config, seed=0, device=CPU)


def test_margin_priority_ignores_weight_every_class_shares() -> None:
    weights = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 3.0]])  # prototype 0: both classes alike
    scores = torch.tensor([[1.0, 0.5, 0.2], [0.4, 0.1, 1.0], [0.6, 0.3, 0.8]])
    labels = torch.tensor([0, 1, 1])
    priority = class_margin_priority(weights, scores, labels)
    assert torch.equal(priority[:, 0], torch.zeros(2))
    expected_class_1 = scores[1:].mean(dim=0) * (weights[1] - weights[0])
    torch.testing.assert_close(priority[1], expected_class_1)
    assert priority[0, 1] > 0 > priority[0, 2]


def test_limit_top_k_by_priority_keeps_at_most_k_and_never_revives() -> None:
    torch.manual_seed(0)
    layer = NonNegativeLinear(8, 3)
    with torch.no_grad():
        layer.mask[0, 5] = 0.0
    priority = torch.arange(8.0).repeat(3, 1)  # prototype 7 first, then 6, 5, ...
    limit_top_k(layer, 3, priority)
    assert ((layer.effective_weight > 0).sum(dim=1) <= 3).all()
    assert layer.mask[0].nonzero().flatten().tolist() == [4, 6, 7]  # 5 was removed before
    assert layer.mask[1].nonzero().flatten().tolist() == [5, 6, 7]


@pytest.mark.parametrize("k", [1, 2])
def test_compact_head_keeps_at_most_k_positive_weights(tiny_run, caches, k) -> None:
    usage = torch.ones(len(tiny_run.stage1_codes))
    head, selection = _train(tiny_run.stage1_codes, usage, caches, top_k_per_class=k, top_k_fallback=())
    assert ((head.class_weights > 0).sum(dim=1) <= k).all()
    assert selection["top_k"] == k and (head.class_weights >= 0).all()


def test_fallback_tries_larger_k_and_chooses_on_validation(tiny_run, caches) -> None:
    usage = torch.ones(len(tiny_run.stage1_codes))
    config = dict(
        top_k_per_class=1,
        top_k_fallback=(2, 16),
        top_k_tolerance=0.0,
        top_k_loss_tolerance=1e9,  # accuracy alone decides here
        temperature_grid=(0.05, 0.5),
    )
    head, selection = _train(tiny_run.stage1_codes, usage, caches, **config)
    trials = selection["trials"]
    dense_best = max(t["val_accuracy"] for t in trials if t["top_k"] == 0)
    tried = sorted({t["top_k"] for t in trials if t["top_k"]})
    chosen = selection["top_k"]
    for k in tried:  # every k before the chosen one lost validation accuracy; none after was tried
        best_k = max(t["val_accuracy"] for t in trials if t["top_k"] == k)
        assert (best_k >= dense_best) == (k == chosen) or (k == tried[-1] == chosen)
    assert tried == [k for k in (1, 2, 16) if k <= chosen]
    assert validation_fit(head.class_layer, _val_scores(head, caches))[0] == selection["val_accuracy"]


def _val_scores(head: ProtoQuantHead, caches) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_scores(head, caches.val, 4, CPU), caches.val.labels


def test_selection_never_reads_the_test_split(tiny_run, caches) -> None:
    """Stage 2 receives train and validation only; scrambling the test cache changes nothing."""
    usage = torch.ones(len(tiny_run.stage1_codes))
    first, record = _train(tiny_run.stage1_codes, usage, caches)
    scrambled = replace(caches, test=replace(caches.test, entries=caches.test.entries[::-1].copy()))
    second, again = _train(tiny_run.stage1_codes, usage, scrambled)
    assert torch.equal(first.class_weights, second.class_weights) and record == again


def test_longer_fit_never_keeps_a_worse_validation_fit() -> None:
    """Same seed, same trajectory: more epochs keep an equal-or-better (accuracy, -loss) point."""
    generator = torch.Generator().manual_seed(1)
    train = torch.rand(60, 6, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    val = torch.rand(12, 6, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    results = []
    for epochs in (3, 12):
        torch.manual_seed(0)
        layer = NonNegativeLinear(6, 3)
        fit_class_layer(layer, train, val, lr=0.1, epochs=epochs, config=HeadConfig(batch_size=16), seed=0)
        accuracy, loss = validation_fit(layer, val)
        results.append((accuracy, -loss))
    assert results[1] >= results[0]


def test_usage_keep_covers_the_share_with_the_most_used() -> None:
    usage = torch.tensor([5.0, 0.0, 40.0, 30.0, 25.0])
    assert usage_keep(usage, 0.4).tolist() == [2]
    assert usage_keep(usage, 0.7).tolist() == [2, 3]
    assert usage_keep(usage, 0.71).tolist() == [2, 3, 4]
    assert usage_keep(usage, 1.0).tolist() == [0, 2, 3, 4]  # the unused prototype never stays
    with pytest.raises(ValueError, match="head.usage_coverage"):
        usage_keep(usage, 0.0)


def test_pruned_model_explains_what_it_computes(tiny_run, caches) -> None:
    """Stage 2 on a usage-pruned codebook: the saved model's logits are its contributions, and the
    explanation's share equals the metric's."""
    codes = tiny_run.stage1_codes
    usage = torch.arange(len(codes), dtype=torch.float32)
    pruned, kept_usage = prune_by_usage(codes, usage, 0.8)
    assert len(pruned) < len(codes) and torch.equal(pruned, codes[usage_keep(usage, 0.8)])
    head, _ = _train(pruned, kept_usage, caches, top_k_per_class=2, top_k_fallback=())
    model = tiny_run.result.model
    compact = ProtoQuant(model.backbone, head, model.classes, model.config)
    images = [tiny_run.result.splits.test.load_image(i) for i in range(3)]
    prediction = compact.predict(images)
    weights = head.class_weights
    torch.testing.assert_close(prediction.logits, head.contributions(prediction.scores).sum(dim=2))
    shares = top_shares(prediction.scores, weights, prediction.classes, 2)
    image = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    for index in range(len(images)):
        explained = explain_prediction(prediction, index, weights, model.classes, image, top_prototypes=2)
        share = explained.predicted.shown_share
        assert share == pytest.approx(float(shares[index]), nan_ok=True)
        assert explained.predicted.num_contributing <= 2


def test_part_coverage_of_a_patch_is_its_own_cell(tiny_run, caches) -> None:
    """A prototype equal to a training patch finds that patch first: its coverage is that cell's."""
    subset, dataset = caches.train_plain, tiny_run.result.splits.train
    features = subset.store.get(subset.entries[:3])  # (3, D, H, W)
    height, width = subset.store.grid
    picks = [(0, 0, 0), (1, height - 1, width - 1), (2, 0, width - 1)]  # (row, h, w)
    codebook = torch.stack([features[row, :, h, w] for row, h, w in picks])  # (3, D)
    coverage = part_coverage(codebook, subset, dataset, top=1, batch_size=4, device=CPU)
    for k, (row, h, w) in enumerate(picks):
        image = int(subset.store.image_index[subset.entries[row]])
        masks = dataset.annotations(image).masks.any(axis=0)  # (S, S), S divisible by the grid
        rows, cols = masks.shape[0] // height, masks.shape[1] // width
        expected = masks[h * rows : (h + 1) * rows, w * cols : (w + 1) * cols].mean()
        assert float(coverage[k]) == pytest.approx(float(expected), abs=1e-6)


def test_top_k_keeps_only_allowed_prototypes(tiny_run, caches) -> None:
    codes = tiny_run.stage1_codes
    allowed = torch.zeros(len(codes), dtype=torch.bool)
    allowed[::3] = True
    config = dict(top_k_per_class=2, top_k_fallback=())
    head, _ = train_head(
        codes,
        torch.ones(len(codes)),
        caches.train,
        caches.val,
        3,
        HeadConfig(epochs=5, top_k_epochs=5, **config),
        seed=0,
        device=CPU,
        allowed=allowed,
    )
    used = (head.class_weights > 0).any(dim=0)
    assert used.any() and not (used & ~allowed).any()


def test_fallback_zero_keeps_the_dense_head_when_k_loses_accuracy(tiny_run, caches) -> None:
    usage = torch.ones(len(tiny_run.stage1_codes))
    config = dict(top_k_per_class=1, top_k_fallback=(0,), top_k_tolerance=0.0, top_k_loss_tolerance=1e9)
    head, selection = _train(tiny_run.stage1_codes, usage, caches, **config)
    trials = selection["trials"]
    dense_best = max(t["val_accuracy"] for t in trials if t["top_k"] == 0)
    cut_best = max(t["val_accuracy"] for t in trials if t["top_k"] == 1)
    if cut_best < dense_best:
        assert selection["top_k"] == 0 and torch.equal(
            head.class_layer.mask, torch.ones_like(head.class_layer.mask)
        )
    else:
        assert selection["top_k"] == 1 and ((head.class_weights > 0).sum(dim=1) <= 1).all()


def _best(trials: list[dict], k: int) -> dict:
    """The trial the selection ranks first among those of k: most accurate, then lowest loss."""
    return max((t for t in trials if t["top_k"] == k), key=lambda t: (t["val_accuracy"], -t["val_loss"]))


def test_a_top_k_head_whose_validation_loss_is_worse_is_not_kept(tiny_run, caches) -> None:
    """With accuracy ignored (tolerance 1), k is kept only where its validation loss is no worse."""
    usage = torch.ones(len(tiny_run.stage1_codes))
    config = dict(top_k_per_class=1, top_k_fallback=(2, 16, 0), top_k_tolerance=1.0, top_k_loss_tolerance=0.0)
    head, selection = _train(tiny_run.stage1_codes, usage, caches, **config)
    trials = selection["trials"]
    limit = _best(trials, 0)["val_loss"]
    tried = [k for k in (1, 2, 16) if any(t["top_k"] == k for t in trials)]
    chosen = selection["top_k"]
    for k in tried:
        kept = _best(trials, k)["val_loss"] <= limit
        assert kept == (k == chosen), (k, chosen, _best(trials, k)["val_loss"], limit)
    if chosen == 0:
        assert all(_best(trials, k)["val_loss"] > limit for k in tried) and tried == [1, 2, 16]
