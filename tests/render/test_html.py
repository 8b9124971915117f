"""The HTML report as files: self-contained, every link resolves, numbers in captions, sorted."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from protoquant.cli import main
from protoquant.render.summary import metrics_table

PAGES = ("index.html", "prototypes.html", "classes.html", "model.html")


class _Links(HTMLParser):
    """Collects img sources, hrefs, ids and the text of elements with class `contrib`."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.contributions: list[float] = []
        self._in_contrib = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        for name in ("href", "src"):
            if tag in ("a", "link", "script") and name in attrs:
                self.hrefs.append(attrs[name])
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self._in_contrib = attrs.get("class") == "contrib"

    def handle_data(self, data):
        if self._in_contrib:
            self.contributions.append(float(data))
            self._in_contrib = False


def _parse(path: Path) -> _Links:
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_report_is_self_contained(report_dir):
    parsed = {page: _parse(report_dir / page) for page in PAGES}
    for page, links in parsed.items():
        text = (report_dir / page).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9]", text.replace("<!DOCTYPE html>", "")), page
        assert "<script" not in text and "@import" not in text
        for src in links.sources:
            assert not src.startswith(("/", "file:")) and (report_dir / src).is_file(), (page, src)
        for href in links.hrefs:
            target, _, anchor = href.partition("#")
            assert not target.startswith("/") and (report_dir / (target or page)).is_file(), (page, href)
            if anchor:
                assert anchor in parsed[target or page].ids, (page, href)


def test_explanations_are_sorted_and_numbered(tiny_report, report_dir):
    text = (report_dir / "index.html").read_text(encoding="utf-8")
    cards = text.split('class="card explanation"')[1:]
    assert len(cards) == len(tiny_report.explanations)
    for card, (name, explanation) in zip(cards, tiny_report.explanations):
        parser = _Links()
        parser.feed(card)
        for shown in explanation.classes:
            assert f"{100 * shown.probability:.1f} %" in card
            assert f"logit {shown.logit:.2f}" in card
        first = parser.contributions[: len(explanation.predicted.prototypes)]
        assert first == sorted(first, reverse=True)
        assert first == [round(p.contribution, 2) for p in explanation.predicted.prototypes]
        assert name in card


def test_gallery_page_lists_every_weighted_prototype(tiny_report, report_dir):
    ids = _parse(report_dir / "prototypes.html").ids
    gallery = tiny_report.gallery
    assert {f"p{k}" for k in gallery.weighted_prototypes()} <= ids
    classes = _parse(report_dir / "classes.html").ids
    assert {f"c{c}" for c in range(len(gallery.classes))} <= classes


def test_report_was_written_with_every_model_call_forbidden(report_dir):
    # `report_dir` wrote the report while nn.Module.__call__ raised; it must be complete.
    assert all((report_dir / page).is_file() for page in PAGES)
    assert len(list((report_dir / "img").glob("*.*"))) > 10


def test_model_page_without_metrics():
    assert "No metrics.json" in metrics_table({})


@pytest.fixture(scope="module")
def checkpoint(tiny_run, tmp_path_factory):
    return tiny_run.result.model.save(tmp_path_factory.mktemp("explain-cli") / "model")


def test_explain_command_writes_the_report(tiny_run, checkpoint, tmp_path, capsys):
    test = tiny_run.result.splits.test
    files = []
    for i in range(2):
        files.append(tmp_path / f"image{i}.png")
        test.load_image(i).save(files[-1])
    out = tmp_path / "report"
    args = [
        "explain",
        *map(str, files),
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--top-prototypes",
        "2",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str((out / "index.html").resolve())
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "image0.png" in text and "image1.png" in text and (checkpoint / "gallery.json").is_file()
    missing = ["explain", str(tmp_path / "missing.png"), "--model", str(checkpoint), "--out", str(out)]
    assert main(missing) == 2
    assert "missing.png" in capsys.readouterr().err
