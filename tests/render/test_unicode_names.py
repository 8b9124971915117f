"""Class folders with any name train, predict and explain: undecodable bytes, emoji, RTL, markup.

Class names are the folder names as text (undecodable bytes as escapes, "caf\\xe9"); image
paths keep the real bytes. The figures, the HTML report and the JSON outputs are written whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import protoquant.pipeline as pipeline
from protoquant.config import DataConfig
from protoquant.data.base import display_name
from protoquant.data.image_folder import ImageFolder
from protoquant.explain.explanation import build_report
from protoquant.explain.gallery import build_gallery
from protoquant.model import ProtoQuant
from protoquant.render import render_explanation, render_overview, write_report
from tests.conftest import tiny_run_config

FOLDERS = (
    b"caf\xe9",  # Latin-1, not UTF-8: no str names it except with a surrogate
    "bird 🐦 ✓".encode(),
    "שלום مرحبا".encode(),  # right-to-left scripts
    b"quotes \"double\" 'single' & amp",
    b"<script>alert(1)<\\script>",
    b"$\\frac{a}{b}$ cost",  # mathtext in matplotlib unless parsing is off
)
IMAGES_PER_CLASS = 5


def _write_folder(root: Path) -> Path:
    folder = os.fsencode(root / "data")
    rng = np.random.default_rng(0)
    try:
        os.mkdir(folder)
        for c, name in enumerate(FOLDERS):
            os.mkdir(os.path.join(folder, name))
            for i in range(IMAGES_PER_CLASS):
                pixels = rng.integers(0, 60, size=(48, 48, 3), dtype=np.uint8) + np.uint8(30 * c)
                Image.fromarray(pixels).save(os.path.join(folder, name, name + b"-%d.png" % i), format="PNG")
    except (OSError, UnicodeError) as error:
        pytest.skip(f"the file system of {root} does not take such names: {error}")
    return Path(os.fsdecode(folder))


@pytest.fixture(scope="module")
def named_run(tmp_path_factory) -> pipeline.RunResult:
    root = tmp_path_factory.mktemp("names")
    config = tiny_run_config(root)
    config = replace(config, data=DataConfig(dataset="image-folder", root=str(_write_folder(root))))
    torch.manual_seed(0)  # the random backbone weights
    return pipeline.run(config)


def test_class_names_are_text_and_image_paths_are_real(named_run) -> None:
    expected = tuple(sorted(os.fsdecode(n) for n in FOLDERS))
    train = named_run.splits.train
    assert named_run.model.classes == tuple(display_name(n) for n in expected)
    assert "caf\\xe9" in named_run.model.classes
    for name in named_run.model.classes:
        name.encode("utf-8")  # no lone surrogates left
    base = train
    while not isinstance(base, ImageFolder):
        base = base.parent
    paths = [base.image_path(i) for i in range(len(base))]
    assert all(p.is_file() for p in paths)
    assert any(b"caf\xe9" in os.fsencode(p) for p in paths)


def test_checkpoint_and_json_outputs_round_trip_the_names(named_run, tmp_path) -> None:
    model = named_run.model
    loaded = ProtoQuant.load(model.save(tmp_path / "model"))
    assert loaded.classes == model.classes
    meta = json.loads((named_run.out / "model" / "config.json").read_text(encoding="utf-8"))
    assert tuple(meta["classes"]) == model.classes
    json.loads((named_run.out / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # emoji: drawn as boxes
def test_predict_explain_report_and_figures_take_every_name(named_run, tmp_path) -> None:
    model, splits = named_run.model, named_run.splits
    prediction = model.predict(splits.test.load_image(0))
    assert model.classes[int(prediction.classes[0])] in model.classes
    gallery = build_gallery(model, named_run.caches.train_plain, top_k=2, dataset=splits.train)
    image_name = os.fsdecode(b"test caf\xe9 <b>.png")  # an explained file name with undecodable bytes
    images = [(image_name, splits.test.load_image(i)) for i in range(2)]
    report = build_report(model, images, gallery, metrics=named_run.metrics, top_prototypes=3)
    index = write_report(report, tmp_path / "report")
    pages = {p.name: p.read_text(encoding="utf-8") for p in index.parent.glob("*.html")}
    assert set(pages) == {"index.html", "prototypes.html", "classes.html", "model.html"}
    assert not list(index.parent.glob(".*tmp*"))  # no half-written page left behind
    html = "".join(pages.values())
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;\\script&gt;" in pages["classes.html"]
    assert "caf\\xe9" in pages["classes.html"] and "test caf\\xe9 &lt;b&gt;.png" in pages["index.html"]
    assert "🐦" in pages["classes.html"] and "nan %" not in html
    explanation = report.explanations[0][1]
    for path in (
        render_explanation(explanation, tmp_path / "figure.png", gallery),
        render_overview(gallery, tmp_path / "overview.png"),
    ):
        assert Image.open(path).size[0] > 0
