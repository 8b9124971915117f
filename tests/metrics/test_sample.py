"""Samples of the expensive protocols: seeded, class-stratified or first n, reproducible and recorded."""

from dataclasses import replace

import numpy as np
import pytest
import torch

import protoquant.metrics.misalignment as mis
from protoquant.errors import ConfigError
from protoquant.metrics import MetricSettings, evaluate_metrics
from protoquant.metrics.sample import choose_images

LABELS = np.repeat(np.arange(4), [10, 20, 30, 40])  # sorted by class, as CUB's test split


def test_the_same_inputs_choose_the_same_images_and_another_seed_others():
    first = choose_images(LABELS, 20, seed=3)
    assert np.array_equal(first.indices, choose_images(LABELS, 20, seed=3).indices)
    assert not np.array_equal(first.indices, choose_images(LABELS, 20, seed=4).indices)
    assert np.all(np.diff(first.indices) > 0) and first.indices.dtype == np.int64  # sorted, distinct


def test_stratified_shares_follow_the_class_sizes():
    sample = choose_images(LABELS, 20, seed=0)
    assert np.bincount(LABELS[sample.indices], minlength=4).tolist() == [2, 4, 6, 8]
    odd = choose_images(LABELS, 7, seed=0)  # 0.7, 1.4, 2.1, 2.8: largest remainders first
    assert np.bincount(LABELS[odd.indices], minlength=4).tolist() == [1, 1, 2, 3]
    assert sample.record() == {"rule": "stratified", "images": 20, "of": 100, "seed": 0}
    assert "class-stratified sample of 20 of 100" in sample.describe()


def test_first_all_and_bad_values():
    assert choose_images(LABELS, 5, seed=0, rule="first").indices.tolist() == [0, 1, 2, 3, 4]
    for size in (0, 100, 500):
        everything = choose_images(LABELS, size, seed=0)
        assert everything.rule == "all" and np.array_equal(everything.indices, np.arange(100))
    with pytest.raises(ConfigError, match="sample_rule"):
        choose_images(LABELS, 5, seed=0, rule="random")
    with pytest.raises(ConfigError, match=">= 0"):
        choose_images(LABELS, -1, seed=0)


@pytest.mark.parametrize("mode", mis.ATTACK_TARGETS)
def test_attack_count_is_the_number_of_planned_attacks(mode):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(12, 6, generator=generator)
    labels = [i % 3 for i in range(12)]
    groups = {0: [1, 4], 1: [], 2: [0, 2, 5]}  # class 1 has no prototype
    planned = mis.attack_plan(mode, scores, labels, groups.__getitem__)
    assert mis.attack_count(mode, labels, groups.__getitem__) == len(planned)


def test_the_sample_is_recorded_and_the_same_on_a_second_run(tiny_metrics_run):
    result = tiny_metrics_run
    settings = MetricSettings(misalignment_images=4, stability_images=5, attack_iterations=1, batch_size=4)
    kwargs = {"settings": settings, "store": result.caches.test.store}
    runs = [evaluate_metrics(result.model, result.splits.test, ["misalignment", "stability"], **kwargs)]
    runs.append(evaluate_metrics(result.model, result.splits.test, ["misalignment", "stability"], **kwargs))
    protocol = runs[0]["protocol"]["metrics"]
    expected = choose_images(result.splits.test.labels, 4, seed=settings.seed)
    assert protocol["misalignment"]["sample"] == expected.record()
    assert protocol["stability"]["sample"]["images"] == 5
    assert [r["index"] for r in runs[0]["rows"]["misalignment"]] == expected.indices.tolist()
    assert runs[0]["rows"]["misalignment"] == runs[1]["rows"]["misalignment"]
    assert runs[0]["stability"] == runs[1]["stability"]
    first = replace(settings, sample_rule="first")
    rows = evaluate_metrics(result.model, result.splits.test, ["misalignment"], settings=first)["rows"]
    assert [r["index"] for r in rows["misalignment"]] == [0, 1, 2, 3]
