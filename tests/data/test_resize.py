"""The downscaled copy of an image tree (protoquant.data.resize)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from protoquant.atomic import host_token
from protoquant.data.image_folder import ImageFolder
from protoquant.data.resize import SETTINGS_FILE, resize_dataset, resized_size
from protoquant.errors import ConfigError, DataError
from tests.test_atomic import dead_pid

ORIENTATION_TAG = 0x0112
SHORTER = 48


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth seeded picture: a resized copy of it should still look like it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        np.sin(x * rng.uniform(3, 8) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(3, 8)) for _ in range(3)
    ]
    return Image.fromarray(((np.stack(channels, axis=-1) * 0.5 + 0.5) * 255).astype(np.uint8))


@pytest.fixture
def tree(tmp_path):
    """An image folder: large and small JPEGs, a PNG, a palette PNG, a rotated photo, a text file."""
    src = tmp_path / "src"
    for split, cls, name, (w, h) in [
        ("train", "cat", "wide.jpg", (200, 120)),
        ("train", "cat", "small.jpg", (40, 30)),
        ("train", "dog", "sub/tall.png", (90, 160)),
        ("train", "dog", "palette.png", (100, 100)),
        ("test", "cat", "t.jpeg", (150, 150)),
    ]:
        path = src / split / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = _picture(w, h, len(name))
        (image.convert("P") if name == "palette.png" else image).save(path, quality=95)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    _picture(160, 100, 9).save(src / "train" / "dog" / "rotated.jpg", exif=exif.tobytes(), quality=95)
    (src / "train" / "notes.txt").write_text("not an image\n")
    return src


def test_the_copy_keeps_paths_labels_formats_and_looks(tree, tmp_path) -> None:
    dst = tmp_path / "dst"
    report = resize_dataset(tree, dst, SHORTER, quality=90, threads=2)
    assert (report.resized, report.copied, report.other_files) == (5, 1, 1)
    before, after = ImageFolder(tree, "train"), ImageFolder(dst, "train")
    assert after.files == before.files and np.array_equal(after.labels, before.labels)
    assert after.fingerprint() != before.fingerprint()  # another dataset: its caches differ
    assert (dst / "train" / "notes.txt").read_text() == "not an image\n"
    assert (dst / "train/cat/small.jpg").read_bytes() == (tree / "train/cat/small.jpg").read_bytes()
    for index in range(len(before)):
        with Image.open(before.image_path(index)) as old, Image.open(after.image_path(index)) as new:
            assert new.format == old.format
            expected = old.size if min(old.size) <= SHORTER else resized_size(*old.size, SHORTER)
            assert new.size == expected and min(new.size) == min(SHORTER, min(old.size))
        # The same picture: the loaded copy is the loaded original downscaled, up to JPEG re-encoding.
        original, copy = before.load_image(index), after.load_image(index)
        expected = np.asarray(original.resize(copy.size, Image.Resampling.LANCZOS), dtype=np.float64)
        assert np.abs(np.asarray(copy, dtype=np.float64) - expected).mean() < 3


def test_the_orientation_tag_still_applies(tree, tmp_path) -> None:
    resize_dataset(tree, tmp_path / "dst", SHORTER)
    with Image.open(tmp_path / "dst/train/dog/rotated.jpg") as image:
        assert image.getexif().get(ORIENTATION_TAG) == 6 and image.size == (76, 48)
    copy = ImageFolder(tmp_path / "dst", "train")
    assert copy.load_image(copy.files.index("dog/rotated.jpg")).size == (48, 76)  # turned upright


def test_bad_arguments_and_files_are_named(tree, tmp_path) -> None:
    with pytest.raises(ConfigError, match="shorter_side"):
        resize_dataset(tree, tmp_path / "dst", 0)
    with pytest.raises(ConfigError, match="quality"):
        resize_dataset(tree, tmp_path / "dst", SHORTER, quality=101)
    with pytest.raises(ConfigError, match="outside the source"):
        resize_dataset(tree, tree / "copy", SHORTER)
    (tree / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        resize_dataset(tree, tmp_path / "dst", SHORTER)


def test_a_second_run_keeps_finished_files_and_redoes_changed_ones(tree, tmp_path) -> None:
    dst = tmp_path / "dst"
    first = resize_dataset(tree, dst, SHORTER)
    again = resize_dataset(tree, dst, SHORTER)
    assert (again.resized, again.copied, again.other_files, again.kept) == (0, 0, 0, 7)
    assert first.kept == 0
    changed = tree / "train" / "cat" / "wide.jpg"
    _picture(220, 120, 99).save(changed, quality=95)
    stamp = (dst / "train/cat/wide.jpg").stat().st_mtime_ns
    os.utime(changed, ns=(stamp + 10**9, stamp + 10**9))  # newer than its copy
    third = resize_dataset(tree, dst, SHORTER)
    assert (third.resized, third.kept) == (1, 6)
    with Image.open(dst / "train/cat/wide.jpg") as image:
        assert image.size == resized_size(220, 120, SHORTER)
    with pytest.raises(ConfigError, match="other|not"):  # its kept files have another size
        resize_dataset(tree, dst, SHORTER + 8)


def test_an_interrupted_run_leaves_whole_files_and_resumes(tree, tmp_path, monkeypatch) -> None:
    dst = tmp_path / "dst"
    real, calls = Image.Image.save, []

    def failing_save(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped while writing the third resized image
        return real(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        resize_dataset(tree, dst, SHORTER, threads=1)
    monkeypatch.undo()
    written = [p for p in dst.rglob("*") if p.is_file() and p.name != SETTINGS_FILE]
    assert written and not [p for p in written if p.name.startswith(".")]  # no partial file
    killed = dst / "train" / "cat" / f".wide.jpg.tmp-{dead_pid()}-{host_token()}"
    killed.write_bytes(b"half a file")  # what a killed (not interrupted) writer leaves
    report = resize_dataset(tree, dst, SHORTER, threads=1)
    assert (
        report.kept == len(written) and report.kept + report.resized + report.copied + report.other_files == 7
    )
    assert not killed.exists()
    resize_dataset(tree, tmp_path / "fresh", SHORTER)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert files(dst) == files(tmp_path / "fresh")  # the resumed copy is the uninterrupted one


def test_the_data_resize_command(tree, tmp_path, capsys) -> None:
    from protoquant.cli import main

    dst = tmp_path / "dst"
    argv = ["data", "resize", "--root", str(tree), "--out", str(dst), "--shorter_side", str(SHORTER)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["resized"], report["copied"], report["other_files"], report["kept"]) == (5, 1, 1, 0)
    assert main(argv) == 0
    assert "7 kept from an earlier run" in capsys.readouterr().out
    assert main(["data", "resize", "--root", str(tmp_path / "nope"), "--out", str(dst)]) == 2
    assert "--root" in capsys.readouterr().err
    assert main([*argv[:-1], "0"]) == 2
    assert "shorter_side" in capsys.readouterr().err
