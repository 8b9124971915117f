"""open_rgb: every common mode becomes 8-bit RGB with hand-computed pixels; bad files are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoquant.data.images import open_rgb, read_rows, to_rgb
from tests.data.layouts import write_image


def saved(tmp_path: Path, image: Image.Image, name: str) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale_is_replicated(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L"), "gray.png")
    assert pixels(open_rgb(path)).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = saved(tmp_path, Image.fromarray(values), "deep.png")
    assert Image.open(path).mode in ("I;16", "I")  # a 16-bit grayscale PNG (older Pillow opens it as "I")
    # v / 257 rounded: 0, 1, 3.89 -> 4, 127.5 -> 128, 255
    assert pixels(open_rgb(path))[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    as_int32 = Image.fromarray(values.astype(np.int32))
    assert pixels(to_rgb(as_int32))[0, :, 1].tolist() == [0, 1, 4, 128, 255]


def test_cmyk_uses_the_standard_conversion(tmp_path: Path) -> None:
    cmyk = np.array([[[0, 255, 255, 0], [255, 255, 0, 0], [0, 0, 0, 55], [0, 0, 0, 0]]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(cmyk, "CMYK"), "print.tif")
    # R = (255 - C)(255 - K) / 255, same for G (M) and B (Y)
    expected = [[255, 0, 0], [0, 0, 255], [200, 200, 200], [255, 255, 255]]
    assert pixels(open_rgb(path))[0].tolist() == expected
    jpeg = saved(tmp_path, Image.fromarray(np.tile(cmyk[:, :1], (8, 8, 1)), "CMYK"), "print.jpg")
    assert np.abs(pixels(open_rgb(jpeg)).astype(int) - [255, 0, 0]).max() <= 8  # lossy


def test_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    path = saved(tmp_path, Image.fromarray(rgba, "RGBA"), "alpha.png")
    assert pixels(open_rgb(path)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    la = Image.fromarray(np.array([[[90, 0]]], dtype=np.uint8), "LA")
    assert pixels(to_rgb(la)).tolist() == [[[90, 90, 90]]]


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    path = saved(tmp_path, image, "palette.png")
    assert pixels(open_rgb(path)).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def test_rgb_is_returned_unchanged(tmp_path: Path) -> None:
    expected = write_image(tmp_path / "noise.png", (7, 5), seed=1)
    np.testing.assert_array_equal(pixels(open_rgb(tmp_path / "noise.png")), expected)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_is_an_error_naming_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    write_image(path, (64, 64), seed=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read image .*cut\{suffix}"):
        open_rgb(path)


def test_not_an_image_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "fake.jpg").write_text("hello")
    with pytest.raises(ValueError, match=r"cannot read image .*fake\.jpg"):
        open_rgb(tmp_path / "fake.jpg")
    with pytest.raises(FileNotFoundError, match=r"absent\.png"):
        open_rgb(tmp_path / "absent.png")
    with pytest.raises(ValueError, match=r"float\.tif: floating-point"):
        to_rgb(Image.new("F", (2, 2)), tmp_path / "float.tif")


def test_read_rows_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "table.txt"
    path.write_text("1 a b\n\n2 c d e\n3 x\n")
    assert read_rows(path, 2, rest=True) == [(1, ["1", "a b"]), (3, ["2", "c d e"]), (4, ["3", "x"])]
    with pytest.raises(ValueError, match=r"table\.txt:3: expected 3 fields, found 4"):
        read_rows(path, 3)
    path.write_bytes(b"1 \xff\n")
    with pytest.raises(ValueError, match=r"table\.txt: not UTF-8"):
        read_rows(path, 2)


ORIENTATION = 0x0112  # the EXIF Orientation tag
ROTATED_CLOCKWISE = 6  # "rotate 90 degrees clockwise to display": how phones store portrait shots


def sideways_jpeg(path: Path, size: tuple[int, int] = (16, 8)) -> np.ndarray:
    """A JPEG whose stored left half is red and right half blue, tagged as stored sideways."""
    width, height = size
    stored = np.zeros((height, width, 3), dtype=np.uint8)
    stored[:, : width // 2, 0] = 255
    stored[:, width // 2 :, 2] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = ROTATED_CLOCKWISE
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif)
    return stored


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = sideways_jpeg(tmp_path / "phone.jpg")
    upright = open_rgb(tmp_path / "phone.jpg")
    assert upright.size == (8, 16)  # (W, H): portrait, as a photo viewer shows it
    expected = np.rot90(stored, k=-1)  # clockwise: the stored left half becomes the top half
    assert np.abs(pixels(upright).astype(int) - expected).mean() < 8  # JPEG rounding only
    assert pixels(upright)[:4, :, 0].min() > 200 and pixels(upright)[-4:, :, 2].min() > 200
    assert open_rgb(tmp_path / "phone.jpg", orient=False).size == (16, 8)


def test_image_folders_load_upright_and_annotated_sets_keep_stored_pixels(tmp_path: Path) -> None:
    from protoquant.data.cub import CUB200
    from protoquant.data.image_folder import ImageFolder
    from tests.data.layouts import write_cub

    sideways_jpeg(tmp_path / "mine" / "train" / "cat" / "a.jpg")
    assert ImageFolder(tmp_path / "mine", "train").load_image(0).size == (8, 16)
    cub = CUB200(write_cub(tmp_path), "train")
    sideways_jpeg(cub.image_path(0), size=(60, 40))  # boxes and parts refer to the stored 60 x 40
    assert cub.load_image(0).size == (60, 40)
