"""A probability, share or logit that is not a finite number is shown as "n/a", never "nan %"."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from protoquant.render.cards import bar, explanation_card
from protoquant.render.figures import explanation_figure, share_text
from protoquant.render.summary import stat_cards
from protoquant.render.text import NOT_AVAILABLE, number, percent
from protoquant.render.tile_cache import TileWriter


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_non_finite_numbers_read_not_available(value) -> None:
    assert percent(value) == NOT_AVAILABLE and number(value) == NOT_AVAILABLE


def test_finite_numbers_keep_their_format() -> None:
    assert percent(0.1234) == "12.3 %" and percent(1.0, 0) == "100 %"
    assert number(-1.234) == "-1.23" and number(2.0, 3) == "2.000"
    assert "width: 0.0%" in bar(math.nan) and "width: 100.0%" in bar(7.0)


def _broken(report):
    """The report with every shown probability, logit and margin NaN."""
    name, explanation = report.explanations[0]
    nan = math.nan
    classes = tuple(replace(c, probability=nan, logit=nan, margin=nan) for c in explanation.classes)
    return replace(report, explanations=((name, replace(explanation, classes=classes)),))


def test_an_explanation_with_nan_numbers_renders_without_nan(tiny_report, tmp_path, no_model) -> None:
    report = _broken(tiny_report)
    explanation = report.explanations[0][1]
    tiles = TileWriter(tmp_path, None, report.gallery)
    html = explanation_card(0, "test #0", explanation, report, tiles, "img/figure-0.png")
    html += stat_cards(report)
    assert "nan" not in html.lower() and f"{NOT_AVAILABLE}</span>" in html
    for rank, shown in enumerate(explanation.classes):
        fig = explanation_figure(explanation, class_rank=rank)
        texts = [fig.get_suptitle()] + [t.get_text() for ax in fig.axes for t in ax.texts]
        assert not any("nan" in t.lower() for t in texts), texts
        assert share_text(shown) == fig.get_suptitle()
