"""Interpretable head: similarity, softmax over prototypes, max-pool, non-negative class layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protoquant.head import NonNegativeLinear, ProtoQuantHead, cosine_similarity_map, presence_scores
from protoquant.train.head import limit_top_k

B, D, H, W, K, C = 3, 8, 4, 5, 12, 4


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def features() -> torch.Tensor:
    return torch.randn(B, D, H, W, generator=_generator(1))


@pytest.fixture
def head() -> ProtoQuantHead:
    torch.manual_seed(0)
    return ProtoQuantHead(torch.randn(K, D, generator=_generator(2)), C, temperature=0.1)


def test_cosine_similarity_map_matches_torch(features) -> None:
    codebook = torch.randn(K, D, generator=_generator(3)) * 5
    similarity = cosine_similarity_map(features, codebook)
    assert similarity.shape == (B, K, H, W)
    expected = F.cosine_similarity(features[:, None], codebook[None, :, :, None, None], dim=2)  # (B, K, H, W)
    torch.testing.assert_close(similarity, expected, atol=1e-6, rtol=1e-5)
    assert similarity.abs().max() <= 1 + 1e-6


def test_cosine_similarity_map_is_scale_invariant(features) -> None:
    codebook = torch.randn(K, D, generator=_generator(4))
    torch.testing.assert_close(
        cosine_similarity_map(features * 7.0, codebook * 0.01), cosine_similarity_map(features, codebook)
    )


def test_softmax_over_prototypes_sums_to_one_and_scores_are_spatial_max(features, head) -> None:
    out = head(features)
    assert out.activation.shape == (B, K, H, W) and out.scores.shape == (B, K) and out.logits.shape == (B, C)
    torch.testing.assert_close(out.activation.sum(dim=1), torch.ones(B, H, W))
    assert (out.activation >= 0).all()
    assert torch.equal(out.scores, out.activation.amax(dim=(2, 3)))
    torch.testing.assert_close(out.similarity, cosine_similarity_map(features, head.codebook))
    torch.testing.assert_close(out.activation, torch.softmax(out.similarity / head.temperature, dim=1))
    assert torch.equal(head.scores(features), out.scores)


def test_presence_scores_temperature_sharpens(features) -> None:
    similarity = cosine_similarity_map(features, torch.randn(K, D, generator=_generator(5)))
    sharp = presence_scores(similarity, 0.01)[0].amax(dim=1)
    soft = presence_scores(similarity, 1.0)[0].amax(dim=1)
    assert (sharp >= soft).all()


def test_effective_weights_are_non_negative_even_for_negative_raw_weights(features, head) -> None:
    with torch.no_grad():
        head.class_layer.weight.copy_(torch.randn(C, K, generator=_generator(6)))
        head.class_layer.weight[0] = -1.0
    assert (head.class_layer.weight < 0).any()
    assert (head.class_weights >= 0).all()
    assert (head.class_weights[0] == 0).all()
    out = head(features)
    assert torch.equal(out.logits[:, 0], torch.zeros(B))
    torch.testing.assert_close(out.logits, out.scores @ torch.relu(head.class_layer.weight).t())


def test_class_logit_is_the_sum_of_contributions(features, head) -> None:
    with torch.no_grad():
        head.class_layer.weight.copy_(torch.randn(C, K, generator=_generator(7)))
    out = head(features)
    contributions = head.contributions(out.scores)
    assert contributions.shape == (B, C, K)
    torch.testing.assert_close(contributions.sum(dim=2), out.logits)
    for b in range(B):
        for c in range(C):
            expected = sum(out.scores[b, k] * head.class_weights[c, k] for k in range(K))
            torch.testing.assert_close(out.logits[b, c], expected)


def test_codebook_is_a_frozen_buffer(head) -> None:
    assert "codebook" in dict(head.named_buffers())
    assert all(p is not head.codebook for p in head.parameters())
    assert [name for name, _ in head.named_parameters()] == ["class_layer.weight"]
    assert head.num_prototypes == K


def test_non_negative_linear_init_mean_is_about_one() -> None:
    torch.manual_seed(0)
    layer = NonNegativeLinear(400, 50)
    weight = layer.weight.detach()
    assert weight.shape == (50, 400)
    assert abs(float(weight.mean()) - 1.0) < 0.01
    assert abs(float(weight.std()) - 0.1) < 0.01
    assert torch.equal(layer.mask, torch.ones(50, 400))
    custom = NonNegativeLinear(400, 50, init_mean=0.5, init_std=0.2)
    weight = custom.weight.detach()
    assert abs(float(weight.mean()) - 0.5) < 0.02 and abs(float(weight.std()) - 0.2) < 0.02


def test_non_negative_linear_gradient_is_zero_for_dead_or_masked_weights() -> None:
    layer = NonNegativeLinear(6, 2)
    with torch.no_grad():
        layer.weight[0, 0] = -1.0
        layer.mask[1, 3] = 0.0
    layer(torch.rand(5, 6, generator=_generator(8))).sum().backward()
    assert layer.weight.grad[0, 0] == 0 and layer.weight.grad[1, 3] == 0
    assert (layer.weight.grad[0, 1:] > 0).all()


@pytest.mark.parametrize("k", [1, 3, K])
def test_limit_top_k_keeps_exactly_k_largest_weights_per_class(k) -> None:
    torch.manual_seed(0)
    layer = NonNegativeLinear(K, C)
    weights_before = layer.effective_weight.detach().clone()
    limit_top_k(layer, k)
    effective = layer.effective_weight.detach()
    assert ((effective != 0).sum(dim=1) == k).all()
    assert ((layer.mask == 1).sum(dim=1) == k).all() and set(layer.mask.unique().tolist()) <= {0.0, 1.0}
    for c in range(C):
        kept = torch.nonzero(effective[c]).flatten()
        assert torch.equal(effective[c, kept], weights_before[c, kept])  # kept weights unchanged
        dropped = weights_before[c][effective[c] == 0]
        if len(dropped):
            assert weights_before[c, kept].min() >= dropped.max()  # the k largest were kept


def test_limit_top_k_larger_than_k_keeps_everything() -> None:
    torch.manual_seed(0)
    layer = NonNegativeLinear(K, C)
    limit_top_k(layer, K + 10)
    assert torch.equal(layer.mask, torch.ones(C, K))


def _fresh_logits(head: ProtoQuantHead, features: torch.Tensor) -> torch.Tensor:
    """Logits recomputed from the head's current tensors, without any reuse."""
    scores = presence_scores(cosine_similarity_map(features, head.codebook), head.temperature)[1]
    return scores @ (torch.relu(head.class_layer.weight) * head.class_layer.mask).t()


def test_reused_codes_and_weights_follow_every_change(head, features) -> None:
    head.requires_grad_(False)
    with torch.no_grad():
        head(features)  # fills the reuse
        head.codebook.mul_(-1.0)  # in place
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
        head.load_state_dict({**head.state_dict(), "class_layer.weight": torch.rand(C, K)})
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
        limit_top_k(head.class_layer, 2)
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
        head.codebook = torch.randn(K, D)  # a new tensor
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
    with torch.inference_mode():
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))


def test_data_assignment_and_data_copy_change_the_output(head, features) -> None:
    head.requires_grad_(False)
    layer = head.class_layer
    with torch.no_grad():
        first = head(features).logits.clone()
        layer.weight.data = torch.rand(C, K, generator=_generator(3)) + 2.0
        second = head(features).logits.clone()
        assert not torch.allclose(first, second)
        torch.testing.assert_close(second, _fresh_logits(head, features))
        layer.weight.data.copy_(torch.rand(C, K, generator=_generator(4)) + 5.0)
        third = head(features).logits.clone()
        assert not torch.allclose(second, third)
        torch.testing.assert_close(third, _fresh_logits(head, features))
        head.codebook.data = torch.randn(K, D, generator=_generator(5))
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
        head.codebook.data.copy_(torch.randn(K, D, generator=_generator(6)))
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
    assert not torch.allclose(third, head(features).logits)


def test_class_weights_still_train(head, features) -> None:
    head(features)  # reuse filled while weights require grad: must not be kept
    loss = head(features).logits.sum()
    loss.backward()
    assert head.class_layer.weight.grad is not None and head.class_layer.weight.grad.abs().sum() > 0


def test_forward_reuses_nothing_even_inside_the_inference_scope(head, features) -> None:
    head.requires_grad_(False)
    with head.inference(), torch.no_grad():
        head.forward_logits(features)  # fills the scope's reuse
        head.codebook.data.copy_(torch.randn(K, D, generator=_generator(11)))  # unseen by versions
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
        head.class_layer.weight.data.mul_(3.0)
        torch.testing.assert_close(head(features).logits, _fresh_logits(head, features))
    torch.testing.assert_close(head.forward_logits(features).logits, _fresh_logits(head, features))
