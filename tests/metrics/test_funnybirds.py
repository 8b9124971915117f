"""FunnyBirds protocols: dilation, strict thresholds, CSDC with every class's minimal sets, D, BI, SD, TS."""

import math

import numpy as np
import pytest
import torch

from protoquant.data.synthetic import minimal_sufficient_sets
from protoquant.metrics.funnybirds import (
    background_relevant,
    best_threshold,
    combine,
    csdc,
    dilate,
    distractibility_terms,
    important,
    irrelevant,
    region_importance,
    single_deletion,
    ts_assumption,
    ts_checks,
    ts_classes,
)
from protoquant.metrics.run_funnybirds import minimal_sets


def test_dilation_is_a_5x5_max_pool():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 4, 4] = True
    assert int(dilate(mask).sum()) == 25 and dilate(mask)[0, 2, 2] == 1 and dilate(mask)[0, 1, 4] == 0


def test_instances_of_one_part_are_dilated_separately_and_summed():
    attribution = torch.ones(10, 10)
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, 0, 0] = True  # eye01 in the corner: 3 x 3 after dilation
    masks[1, 0, 1] = True  # eye02 next to it: 3 x 4, overlapping eye01's dilation
    masks[2, 5, 5] = True  # beak: 5 x 5
    importance = region_importance(attribution, masks, np.array([0, 0, 1]), 2)
    assert importance.tolist() == [9 + 12, 25]


def test_important_is_strict_at_the_boundary():
    flags = important(np.array([10.0, 5.0, 4.9]), 100.0, np.array([0.05, 0.1]))
    assert flags.tolist() == [[True, False, False], [False, False, False]]


def test_csdc_max_over_minimal_sets_and_the_last_class_has_its_sets():
    flags = np.array([[True, False, True, False]])
    assert csdc(flags, [(0, 1), (2,)]).tolist() == [1.0]
    assert csdc(flags, [(0, 1)]).tolist() == [0.5]
    assert csdc(flags, []).tolist() == [0.0]
    class_parts = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]])

    class Interventions:  # a dataset exposing only its class table
        pass

    base = Interventions()
    base.class_parts = class_parts
    last = len(class_parts) - 1
    sets = minimal_sets(base, last)
    assert sets == minimal_sufficient_sets(class_parts, last) == [(1,)]  # the reference finds none here
    assert csdc(np.array([[False, True, False]]), sets).tolist() == [1.0]


def test_irrelevant_and_background_relevance_boundaries():
    removed = np.array([9.5, 9.6, 10.5, 5.0])  # original 10: drops 0.5 (= 5 %), 0.4, increase, 5
    assert irrelevant(10.0, removed).tolist() == [False, True, True, False]
    assert background_relevant(10.0, removed).tolist() == [True, False, False, True]


def test_distractibility_skips_images_without_irrelevant_regions():
    regions = np.array([[True, True, False], [False, True, False]])
    assert distractibility_terms(regions, np.array([False, False, False])) is None
    assert distractibility_terms(regions, np.array([True, False, True])).tolist() == [0.5, 0.0]


def test_single_deletion_spearman():
    assert single_deletion(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert single_deletion(np.array([3.0, 2.0, 1.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(0.0)
    assert math.isnan(single_deletion(np.array([1.0, 1.0]), np.array([1.0, 2.0])))


def test_target_sensitivity_pair_assumption_and_checks():
    class_parts = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1]])
    pair = ts_classes(class_parts, 0)
    assert pair is not None
    first, second, overlap1, overlap2 = pair
    assert (first, second) == (1, 2) and overlap1.tolist() == [0] and overlap2.tolist() == [3]
    original = np.array([5.0, 4.0, 4.0, 0.0])
    assert ts_assumption(original, np.array([5, 1, 3.5, 0]), np.array([5, 3.5, 1, 0]), 1, 2)
    assert not ts_assumption(original, np.array([5, 3.5, 3.5, 0]), np.array([5, 1, 1, 0]), 1, 2)
    assert ts_checks(np.array([3.0, 0, 0, 1]), np.array([1.0, 0, 0, 2]), overlap1, overlap2) == (1.0, 1.0)
    assert ts_classes(np.array([[0, 0], [1, 1]]), 0) is None


def test_threshold_choice_and_aggregates():
    per = {
        "csdc": np.array([0.3, 0.6, 0.6]),
        "pc": np.array([0.9, 0.6, 0.6]),
        "dc": np.array([0.0, 0.3, 0.3]),
        "d": np.array([0.5, 0.5, 0.5]),
    }
    assert best_threshold(*per.values()) == 1  # objective 0.9, 1.0, 1.0: first maximum
    scores = combine(per, {"accuracy": 1.0, "bi": 0.9, "sd": 0.6, "ts": 0.8}, np.array([0.01, 0.02, 0.03]))
    assert scores.threshold == 0.02 and scores.completeness == pytest.approx((0.5 + 0.5) / 2)
    assert scores.headline == pytest.approx((0.5 + 0.6 + 0.8) / 3)
