"""Bad datasets and images given to `train --data.root` (image-folder and CUB layouts).

Unreadable files and impossible layouts must be errors naming the file, folder or line. Odd
but valid input (an empty class folder, unusual class names, grayscale / RGBA / CMYK / 1 x 1
pictures) must train, report what it left out, and keep the names intact: `predict --json` stays
strict JSON, and the HTML report of `explain` is complete and escapes every class name.
"""

from __future__ import annotations

import html
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from fault_cases.checkpoints import report_problem
from fault_cases.harness import (
    HANDLED,
    NAMED,
    Case,
    Outcome,
    Workspace,
    finite_metrics_problem,
    first_problem,
    json_problem,
    judge,
)
from fault_cases.references import MODEL_FLAGS


def train_args(root: str = "data", *extra: str) -> list[str]:
    return ["train", "--out", "run", "--data.root", root, *MODEL_FLAGS, *extra]


TRAIN = train_args()
ODD_NAMES = ("🐦 bird", 'o\'neil "q" & co', "<script>alert(1)")


def _first_image(data: Path, folder: str = "class0") -> Path:
    return sorted((data / folder).iterdir())[0]


def _truncated_jpeg(data: Path) -> None:
    Image.open(_first_image(data)).save(data / "class0" / "cut.jpg", quality=90)
    path = data / "class0" / "cut.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _single_class(data: Path) -> None:
    for name in ("class1", "class2"):
        shutil.rmtree(data / name)


def _no_images(data: Path) -> None:
    for path in list(data.rglob("*.png")):
        path.rename(path.with_suffix(".txt"))


def _odd_modes(data: Path) -> None:
    """Grayscale, RGBA, CMYK JPEG, 1 x 1 and upper-case-extension pictures among the others."""
    files = sorted((data / "class0").iterdir())
    Image.open(files[0]).convert("L").save(files[0])
    Image.open(files[1]).convert("RGBA").save(files[1])
    Image.open(files[2]).convert("CMYK").save(data / "class0" / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(data / "class1" / "tiny.png")
    files[3].rename(files[3].with_name("upper.PNG"))


def _split_file(data: Path) -> None:
    lines = [f"{p.relative_to(data).as_posix()} train" for p in sorted(data.rglob("*.png"))]
    (data / "split.txt").write_text("\n".join([*lines, "class0/not_there.png test"]) + "\n")


def _unknown_test_class(data: Path) -> None:
    (data / "train").mkdir()
    for name in ("class0", "class1", "class2"):
        (data / name).rename(data / "train" / name)
    (data / "test" / "extra").mkdir(parents=True)
    shutil.copy(_first_image(data / "train"), data / "test" / "extra" / "x.png")


def _cub_edit(edit: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        path = data / "CUB_200_2011" / "images.txt"
        path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")

    return apply


def _missing_image_line(lines: list[str]) -> list[str]:
    return lines[:2] + [lines[2].replace("img3.png", "img3_gone.png")] + lines[3:]


SPLIT_FILE = ("--data.split_file", "split.txt")
CUB = ("--data.dataset", "cub")
BROKEN = {  # name -> (damage to a copy of the dataset, words the error must name, extra train flags)
    "zero-byte-jpeg": (lambda d: (d / "class0" / "zero.jpg").write_bytes(b""), ("zero.jpg",), ()),
    "truncated-jpeg": (_truncated_jpeg, ("cut.jpg",), ()),
    "text-file-named-jpg": (
        lambda d: (d / "class1" / "notes.jpg").write_text("not a picture\n"),
        ("notes.jpg",),
        (),
    ),
    "single-class": (_single_class, ("class",), ()),
    "no-images": (_no_images, ("image",), ()),
    "split-file-missing-entry": (_split_file, ("split.txt", "not_there.png"), SPLIT_FILE),
    "test-class-unknown-to-train": (_unknown_test_class, ("extra",), ()),
    "cub-images-txt-short-line": (_cub_edit(lambda lines: [*lines, "13"]), ("images.txt",), CUB),
    "cub-images-txt-bad-id": (
        _cub_edit(lambda lines: ["x " + lines[0].split()[1], *lines[1:]]),
        ("images.txt",),
        CUB,
    ),
    "cub-images-txt-duplicate-id": (_cub_edit(lambda lines: [*lines, lines[0]]), ("images.txt",), CUB),
    "cub-images-txt-missing-file": (_cub_edit(_missing_image_line), ("img3_gone.png",), CUB),
}


def _broken_case(name: str, damage, names, extra) -> Case:
    def run(ws: Workspace) -> Outcome:
        data = ws.copy(ws.refs.cub if name.startswith("cub") else ws.refs.folder, "data")
        damage(data)
        proc = ws.cli(train_args("data", *extra))
        return judge(proc, names=names, check=lambda: "the broken input was accepted")

    return Case(f"data-{name}", "bad dataset", run)


def _accepted_case(name: str, damage, *, cub: bool = False, reported: str = "") -> Case:
    """Valid input that must train; `reported`: a word stderr must show (what was left out)."""

    def run(ws: Workspace) -> Outcome:
        data = ws.copy(ws.refs.cub if cub else ws.refs.folder, "data")
        damage(data)
        proc = ws.cli(TRAIN)

        def check() -> str | None:
            said = not reported or reported in proc.stderr
            return first_problem(
                lambda: finite_metrics_problem(ws.dir / "run" / "metrics.json"),
                lambda: None if said else f"'{reported}' was left out without a word",
            )

        return judge(proc, names=(reported,) if reported else (), check=check)

    return Case(f"data-{name}", "bad dataset", run, accept=(HANDLED, NAMED) if reported else (HANDLED,))


def _non_utf8_case() -> Case:
    def run(ws: Workspace) -> Outcome:
        data = ws.copy(ws.refs.folder, "data")
        os.rename(data / "class2", os.fsencode(data) + b"/caf\xe9")
        proc = ws.cli(TRAIN)
        if proc.rc != 0:
            return judge(proc, names=("caf",))
        image = str(ws.refs.images / "picture0.png")
        predicted = ws.cli(["predict", "--model", "run/model", "--json", image])
        return judge(
            predicted, names=("caf",), check=lambda: json_problem(predicted.stdout, ("predictions",))
        )

    return Case("data-non-utf8-class-name", "bad dataset", run, accept=(HANDLED, NAMED))


def escaping_problem(index: Path, names: tuple[str, ...]) -> str | None:
    """Why the report is incomplete, shows a class name unescaped on any page, or lacks one."""
    problem = report_problem(index)
    if problem:
        return problem
    text = "".join(page.read_text() for page in sorted(index.parent.glob("*.html")))
    if "<script>alert(1)" in text:
        return "a class name reaches the HTML unescaped"
    missing = [n for n in names if html.escape(n) not in text and html.escape(n, quote=False) not in text]
    return f"class name {missing[0]!r} missing from the report" if missing else None


def _odd_names_case() -> Case:
    def run(ws: Workspace) -> Outcome:
        data = ws.copy(ws.refs.folder, "data")
        for index, name in enumerate(ODD_NAMES):
            (data / f"class{index}").rename(data / name)
        proc = ws.cli(TRAIN)
        if proc.rc != 0:
            return judge(proc)
        image = str(ws.refs.images / "picture0.png")
        explained = ws.cli(
            ["explain", image, "--model", "run/model", "--out", "report", "--top_classes", "3"]
        )
        return judge(explained, check=lambda: escaping_problem(ws.dir / "report" / "index.html", ODD_NAMES))

    return Case("data-emoji-quotes-script-class-names", "bad dataset", run, accept=(HANDLED,))


def cases(refs) -> list[Case]:
    out = [_broken_case(name, *spec) for name, spec in BROKEN.items()]
    out += [
        _accepted_case("cub-intact", lambda d: None, cub=True),
        _accepted_case("odd-picture-modes", _odd_modes),
        _accepted_case("empty-class-folder", lambda d: (d / "empty_class").mkdir(), reported="empty_class"),
        _non_utf8_case(),
        _odd_names_case(),
    ]
    out += [
        _missing_root_case("missing-root", "nowhere", None),
        _missing_root_case(
            "root-is-a-file", "data.txt", lambda folder: (folder / "data.txt").write_text("x")
        ),
    ]
    return out


def _missing_root_case(name: str, root: str, setup) -> Case:
    def run(ws: Workspace) -> Outcome:
        if setup:
            setup(ws.dir)
        proc = ws.cli(train_args(root))
        return judge(proc, names=(root,), check=lambda: "a missing data.root was accepted")

    return Case(f"data-{name}", "bad dataset", run)
