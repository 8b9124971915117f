"""The report states the dataclass shares, and draws the gallery once per model (tiles reused)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import protoquant.render.cards as cards
from protoquant.render import write_report
from protoquant.render.figures import share_text


def test_report_prints_the_shares_of_the_dataclass(tiny_report, report_dir):
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    cards_html = text.split('class="card explanation"')[1:]
    for card, (_, explanation) in zip(cards_html, tiny_report.explanations):
        for shown in explanation.classes:
            stated = share_text(shown).replace("−", "&minus;")
            assert share_text(shown) in card or stated in card
            assert f"{100 * shown.shown_share:.1f} % of the class-specific logit" in card


def _forbid_drawing(monkeypatch):
    def drawn(*args, **kwargs):
        raise AssertionError("a gallery tile was drawn again")

    for name in ("patch_tile", "strip_tile", "source_tile"):
        monkeypatch.setattr(cards, name, drawn)


def test_gallery_tiles_are_drawn_once_and_reused(tiny_report, tmp_path, monkeypatch, no_model):
    report = replace(tiny_report, tile_cache=str(tmp_path / "tiles"))
    first = write_report(report, tmp_path / "first").parent
    cached = sorted(p.name for p in (tmp_path / "tiles").rglob("*.jpg"))
    assert cached and any(name.startswith("strip-") for name in cached)
    _forbid_drawing(monkeypatch)
    second = write_report(report, tmp_path / "second").parent  # nothing of the gallery is drawn
    for name in cached:
        assert (second / "img" / name).read_bytes() == (first / "img" / name).read_bytes()
    other = replace(report, gallery=replace(report.gallery, model_hash="0" * 64))  # another model
    with pytest.raises(AssertionError, match="drawn again"):
        write_report(other, tmp_path / "third")
