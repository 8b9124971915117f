"""Grounding audit and drift: duplicates, usage, dead prototypes, per-prototype drift."""

import numpy as np
import pytest
import torch

from protoquant.metrics.grounding import drift, duplicate_of, summarise, usage_from_similarity


def test_duplicates_point_to_the_lowest_other_index():
    codes = torch.tensor([[1.0, 0.0], [2.0, 0.0001], [0.0, 1.0], [1.0, 1.0]])
    assert duplicate_of(codes).tolist() == [1, 0, -1, -1]  # 0 and 1 are parallel; 3 is 45 degrees off
    assert duplicate_of(codes, threshold=0.7).tolist() == [1, 0, 3, 0]


def test_usage_counts_argmax_locations_and_dead_prototypes():
    similarity = torch.zeros(1, 3, 2, 2)
    similarity[0, 0] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    similarity[0, 2] = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    usage = usage_from_similarity(similarity).numpy()
    assert usage.tolist() == [2, 0, 2]
    summary = summarise(
        np.array([1.0, 0.2, 0.9]), usage, np.array([-1, -1, 0]), np.array([True, False, False])
    )
    assert (summary.num_used, summary.num_dead, summary.num_duplicates) == (2, 1, 1)
    assert summary.mean_cosine_used == pytest.approx(0.95) and summary.min_cosine_used == 0.9
    assert summary.mean_cosine_explaining == 1.0


def test_drift_per_code_and_nearest_patch_change():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    result = drift(a, b, (np.array([3, 4]), np.array([0, 1])), (np.array([3, 4]), np.array([0, 2])))
    assert result.cosine_distance[0] == pytest.approx(0.0, abs=1e-7)
    assert result.cosine_distance[1] == pytest.approx(1 - 2**-0.5, abs=1e-6)
    assert result.num_moved == 1 and result.nearest_changed.tolist() == [False, True]
    with pytest.raises(ValueError, match="one shape"):
        drift(a, torch.zeros(3, 2), (np.zeros(2), np.zeros(2)), (np.zeros(3), np.zeros(3)))
