"""Explanation sizes: thresholds at the boundary, predicted class, weights never modified."""

import torch

from protoquant.metrics.size import explanation_size, global_size, local_sizes, per_class_sizes, sparsity

W = torch.tensor([[0.5, 1e-3, 0.0, 0.2], [0.0, 0.0, 2e-3, 0.1]])  # (C=2, K=4)


def test_global_size_and_sparsity_boundary():
    assert global_size(W) == 3  # prototype 1's max is exactly 1e-3: not counted; 2e-3 is
    assert global_size(torch.tensor([[1e-3, 0.0]])) == 0
    assert sparsity(W) == 4 / 8  # 1e-3 and the three zeros are <= 1e-3


def test_local_size_uses_predicted_class_and_absolute_contribution():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.004], [0.01, 0.02, 0.5, 1.0]])
    predicted = torch.tensor([0, 1])
    # image 0, class 0: 0.5, 1e-3 (not > 1e-3), 0, 0.0008 -> 1
    # image 1, class 1: 0, 0, 0.001 (not >), 0.1 -> 1
    assert local_sizes(scores, W, predicted).tolist() == [1, 1]


def test_per_class_size_boundary_and_no_mutation():
    before = W.clone()
    assert per_class_sizes(W).tolist() == [2, 0]  # 0.1 is not > 0.1
    sizes = explanation_size(W, torch.tensor([1, 3]))
    assert sizes.local_size == 2.0 and sizes.per_class_sizes == (2, 0) and sizes.global_size == 3
    assert torch.equal(W, before)
