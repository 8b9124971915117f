"""The report in a real browser: headless Debian chromium opens every page from file://.

Every image must load (naturalWidth > 0), the console must stay free of errors, no request may
leave the report folder, and nothing may scroll sideways, on a desktop and on a phone width.
The checker itself is tested on pages that break each rule, so a pass means something.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PAGES = ("index.html", "prototypes.html", "classes.html", "model.html")

DESKTOP, PHONE = (1280, 900), (390, 844)  # viewport (width, height) in CSS px
SCREENSHOTS = "PROTOQUANT_SCREENSHOTS"  # env var: a folder to keep the screenshots in (for people)


def _keep(screenshot: Path) -> None:
    folder = os.environ.get(SCREENSHOTS)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(folder) / screenshot.name)


@pytest.mark.parametrize("page", PAGES)
def test_report_page_loads_offline_without_errors(open_page, problems, report_dir, page, tmp_path):
    check = open_page((report_dir / page).as_uri(), tmp_path / f"desktop-{page}.png", *DESKTOP)
    _keep(check.screenshot)
    assert check.images, f"{page} shows no images"
    assert problems(check, report_dir) == []
    assert check.overflow == 0, f"{page} scrolls sideways by {check.overflow} px"
    with Image.open(check.screenshot) as shot:
        assert shot.width == DESKTOP[0] and shot.height >= DESKTOP[1]
        assert len(np.unique(np.asarray(shot.convert("L")))) > 16, "the screenshot is blank"


def test_report_fits_a_phone(open_page, problems, report_dir, tmp_path):
    check = open_page((report_dir / "index.html").as_uri(), tmp_path / "phone-index.html.png", *PHONE)
    _keep(check.screenshot)
    assert problems(check, report_dir) == []
    assert check.overflow == 0, f"the explanations page scrolls sideways by {check.overflow} px on a phone"


PIXEL = '<img src="ok.png" alt="fine">'  # a local image that loads
BROKEN_PAGES = {  # snippet -> the problem the checker must report
    "broken image": ('<img src="missing.png" alt="x">', "image did not load: missing.png"),
    "external image": (
        '<img src="http://example.invalid/x.png" alt="x">',
        "request outside the report: http://example.invalid/x.png",
    ),
    "external stylesheet": (
        '<link rel="stylesheet" href="https://example.invalid/s.css">',
        "request outside the report: https://example.invalid/s.css",
    ),
    "file outside the report": ('<img src="../outside.png" alt="x">', "request outside the report: file://"),
    "console error": ("<script>console.error('boom')</script>", "console error: boom"),
    "uncaught exception": ("<script>missingFunction()</script>", "console error: ReferenceError"),
}


def _page(folder: Path, snippet: str) -> Path:
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "ok.png")
    Image.new("RGB", (8, 8), (30, 30, 200)).save(folder.parent / "outside.png")
    page = folder / "index.html"
    page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{PIXEL}{snippet}</body></html>")
    return page


def test_checker_passes_a_clean_page(open_page, problems, tmp_path):
    page = _page(tmp_path / "site", "")
    check = open_page(page.as_uri(), tmp_path / "clean.png")
    assert check.images == [["ok.png", 8, True]]
    assert problems(check, page.parent) == []


@pytest.mark.parametrize("case", sorted(BROKEN_PAGES))
def test_checker_catches(open_page, problems, tmp_path, case):
    snippet, expected = BROKEN_PAGES[case]
    page = _page(tmp_path / "site", snippet)
    found = problems(open_page(page.as_uri(), tmp_path / "broken.png"), page.parent)
    assert any(problem.startswith(expected) for problem in found), found
