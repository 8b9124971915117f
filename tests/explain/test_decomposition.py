"""The logit decomposes exactly: class-agnostic part + class-specific contributions, and the margin
over the runner-up is a sum over prototypes too."""

from __future__ import annotations

import pytest
import torch

from protoquant.explain.explanation import explain

IMAGES = 3


@pytest.fixture(scope="module")
def model(tiny_run):
    return tiny_run.result.model


@pytest.fixture(scope="module")
def images(tiny_run):
    return [tiny_run.result.splits.test.load_image(i) for i in range(IMAGES)]


def test_removing_the_class_agnostic_weight_leaves_every_probability_unchanged(model, images):
    prediction = model.predict(images)
    weights = model.head.class_weights.detach()  # (C, K)
    specific = weights - weights.amin(dim=0, keepdim=True)  # (C, K), still >= 0
    assert (specific >= 0).all() and (specific.amin(dim=0) == 0).all()
    logits = prediction.scores @ specific.t()  # (B, C)
    torch.testing.assert_close(logits.softmax(dim=1), prediction.probabilities, atol=1e-6, rtol=0)
    shift = prediction.logits - logits  # (B, C): the same for every class of an image
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5, rtol=0)


def test_specific_parts_and_margin_contributions_sum_exactly(model, images):
    classes, num_prototypes = len(model.classes), model.head.num_prototypes
    for image in images:
        explanation = explain(model, image, top_classes=classes, top_prototypes=num_prototypes, gallery=False)
        logits = {c.class_index: c.logit for c in explanation.classes}
        for shown in explanation.classes:
            assert sum(p.specific for p in shown.prototypes) == pytest.approx(shown.specific_logit, abs=1e-4)
            assert shown.agnostic == explanation.predicted.agnostic  # one value for every class
            assert shown.margin == pytest.approx(shown.logit - logits[shown.runner_up], abs=1e-5)
            total_margin = sum(p.margin_contribution for p in shown.prototypes)
            assert total_margin == pytest.approx(shown.margin, abs=1e-4)
            assert all(p.specific >= -1e-7 for p in shown.prototypes)
        assert explanation.predicted.margin >= 0  # the prediction leads its runner-up
        assert explanation.predicted.shown_share == pytest.approx(1.0, abs=1e-4)


def test_shares_of_a_short_explanation(model, images):
    explanation = explain(model, images[0], top_classes=1, top_prototypes=2, gallery=False)
    shown = explanation.predicted
    expected = sum(p.specific for p in shown.prototypes) / shown.specific_logit
    assert shown.shown_share == pytest.approx(expected)
    assert 0 <= shown.shown_share <= 1 + 1e-6
