"""Decoding JPEG files on the device (cache.decode = 'device'): libjpeg on the CPU, and nvJPEG too
where CUDA is present (the tests marked with DEVICES; `benchmarks/gpu.sh` runs them there).

On the CPU the device path decodes with the same libjpeg as PIL (identical pixels before
resizing), so what differs is PIL's resize against torchvision's antialiased tensor resize. On
CUDA the same bounds are asked of nvJPEG, whose chroma upsampling is its own.
"""

from __future__ import annotations

import copy
import io
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from protoquant.cache import decode
from protoquant.cache.build import FeatureStore, ImageViews, build_cache, cache_key
from protoquant.cache.decode import (
    DecodedView,
    DeviceDecodeViews,
    EncodedView,
    collate_views,
    decode_site,
    jpeg_size,
)
from protoquant.cache.manifest import read_manifest
from protoquant.data.base import ImageFile, stable_hash
from protoquant.data.cars import StanfordCars
from protoquant.data.cub import CUB200
from protoquant.data.image_folder import ImageFolder
from protoquant.data.transforms import ViewTransform
from protoquant.errors import ConfigError
from tests.data.layouts import write_cars, write_cub

CPU = torch.device("cpu")
DEVICES = [CPU, *([torch.device("cuda")] if torch.cuda.is_available() else [])]
# Bounds over the device-decoded views of this fixture, in uint8 levels: PIL's resize against
# torchvision's antialiased tensor resize of identically decoded pixels. Measured: mean 0.12-0.16,
# max 1 (bilinear) and 8 (bicubic); patch cosine of a tiny random backbone >= 0.9993.
MEAN_LEVELS = 0.5  # mean |difference| per pixel value
MAX_LEVELS = {"bilinear": 2, "bicubic": 12}  # largest single difference
MIN_PATCH_COSINE = 0.998
ORIENTATION_TAG = 0x0112
# name: (width, height, PIL mode, format, extra save options); class folder = first letter
FILES = {
    "a_wide.jpg": (160, 90, "RGB", "JPEG", {}),
    "a_tall.jpg": (70, 130, "RGB", "JPEG", {"progressive": True}),
    "a_gray.jpg": (120, 100, "L", "JPEG", {}),
    "b_cmyk.jpg": (96, 96, "CMYK", "JPEG", {}),
    "b_plain.png": (110, 80, "RGB", "PNG", {}),
    "b_square.jpg": (64, 64, "RGB", "JPEG", {}),
}
DEVICE_DECODED = {"a_wide.jpg", "a_tall.jpg", "a_gray.jpg", "b_square.jpg"}  # CMYK and PNG: PIL


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth seeded picture (gradients and a disc), like a photo more than noise is."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        np.sin(x * rng.uniform(4, 12) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(4, 12)) for _ in range(3)
    ]
    rgb = (np.stack(channels, axis=-1) * 0.5 + 0.5) * 255  # (H, W, 3)
    cx, cy, r = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, min(width, height) / 4
    rgb[(np.mgrid[0:height, 0:width][1] - cx) ** 2 + (np.mgrid[0:height, 0:width][0] - cy) ** 2 < r * r] = 240
    return Image.fromarray(rgb.astype(np.uint8))


def write_folder(root: Path) -> ImageFolder:
    """FILES under root/train/<class>/ (and one image under root/test/), as an ImageFolder."""
    for seed, (name, (width, height, mode, fmt, options)) in enumerate(FILES.items()):
        folder = root / "train" / name[0]
        folder.mkdir(parents=True, exist_ok=True)
        _picture(width, height, seed).convert(mode).save(folder / name, fmt, quality=92, **options)
    (root / "test" / "a").mkdir(parents=True)
    _picture(50, 40, 99).save(root / "test" / "a" / "x.jpg", quality=92)
    return ImageFolder(root, "train")


@pytest.fixture
def folder(tmp_path) -> ImageFolder:
    return write_folder(tmp_path / "images")


def _transform(backbone, **changes) -> ViewTransform:
    info = backbone.info
    return replace(ViewTransform(64, 1.0, info.mean, info.std, min_crop_scale=0.3, seed=5), **changes)


def _both_paths(
    dataset, transform, views: int, on: torch.device = CPU
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(E, 3, S, S) uint8 pixels of every entry by the workers path and by the device path (decoded
    on `on`, returned on the CPU), and the items."""
    source = DeviceDecodeViews(dataset, transform, views)
    items = [source[e] for e in range(len(source))]
    device = source.device_pixels(collate_views(items), on).cpu()  # one mixed batch
    workers = torch.stack([ImageViews(dataset, transform, views)[e] for e in range(len(source))])
    return workers, device, items


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs().float()


def _assert_close_views(workers: torch.Tensor, device: torch.Tensor, items: list, interpolation: str) -> None:
    """Device-decoded rows within the measured bounds; rows PIL decoded in the worker identical."""
    on_device = torch.tensor([isinstance(i, EncodedView) for i in items])
    levels = _levels(workers[on_device], device[on_device])
    assert levels.mean() <= MEAN_LEVELS and levels.max() <= MAX_LEVELS[interpolation]
    assert torch.equal(workers[~on_device], device[~on_device])


def test_plain_jpegs_go_to_the_device_and_the_others_to_pil(folder, convnext) -> None:
    _, _, items = _both_paths(folder, _transform(convnext), 1)
    names = [Path(f).name for f in folder.files]
    kinds = {name: type(item) for name, item in zip(names, items)}
    assert {n for n, k in kinds.items() if k is EncodedView} == DEVICE_DECODED
    assert {n for n, k in kinds.items() if k is DecodedView} == set(FILES) - DEVICE_DECODED


@pytest.mark.parametrize("on", DEVICES, ids=str)
@pytest.mark.parametrize("crop_ratio", [1.0, 0.875])
def test_view_0_is_close_to_the_workers_path(folder, convnext, crop_ratio, on) -> None:
    workers, device, items = _both_paths(folder, _transform(convnext, crop_ratio=crop_ratio), 1, on)
    _assert_close_views(workers, device, items, "bilinear")


@pytest.mark.parametrize("on", DEVICES, ids=str)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_augmented_views_crop_the_same_region(folder, convnext, interpolation, on) -> None:
    views, side = 4, 64
    transform = _transform(convnext, interpolation=interpolation)
    workers, device, items = _both_paths(folder, transform, views, on)
    _assert_close_views(workers, device, items, interpolation)
    # Another view of the same image is far off, so the bounds above tell one region from another.
    per_image = workers.view(len(folder), views, 3, side, side)  # (N, views, 3, S, S)
    assert _levels(per_image[:, 1:], per_image[:, :1]).mean() > 10 * MEAN_LEVELS
    assert any(isinstance(i, EncodedView) and i.geometry.flip for i in items)  # flips are exercised


@pytest.mark.parametrize("on", DEVICES, ids=str)
def test_features_of_both_paths_agree(folder, convnext, on) -> None:
    transform = _transform(convnext)
    workers, device, _ = _both_paths(folder, transform, 3, on)
    with torch.inference_mode():
        a, b = (convnext(transform.normalise(p)) for p in (workers, device))  # (E, D, H, W)
    assert F.cosine_similarity(a, b, dim=1).min() >= MIN_PATCH_COSINE


def test_geometry_with_pil_is_exactly_the_workers_pixels(convnext) -> None:
    transform = _transform(convnext, interpolation="bicubic")
    for seed, (width, height) in enumerate([(97, 61), (40, 130), (64, 64), (300, 200)]):
        image = _picture(width, height, seed)
        for ratio in (1.0, 0.875):
            framed = replace(transform, crop_ratio=ratio)
            for index, view in [(seed, 0), (seed, 1), (seed + 3, 2), (7, 5)]:
                g = framed.geometry(width, height, index, view)
                crop = image.crop((g.left, g.top, g.left + g.width, g.top + g.height))
                resized = (
                    crop.resize(g.resize[::-1], Image.Resampling.BICUBIC)
                    if crop.size != g.resize[::-1]
                    else crop
                )
                left, top = round((resized.width - g.size) / 2), round((resized.height - g.size) / 2)
                view_image = resized.crop((left, top, left + g.size, top + g.size))
                view_image = view_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if g.flip else view_image
                expected = framed.pixels(image, index, view)
                assert torch.equal(torch.from_numpy(np.array(view_image)).permute(2, 0, 1), expected)


@pytest.mark.parametrize("on", DEVICES, ids=str)
def test_rotated_truncated_and_refused_files_fall_back_to_pil(tmp_path, convnext, on) -> None:
    picture = _picture(80, 60, 1)
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6  # stored sideways: load_image turns it upright
    picture.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    data = (tmp_path / "rotated.jpg").read_bytes()
    assert jpeg_size(data, orient=True) is None and jpeg_size(data, orient=False) == (80, 60)
    assert jpeg_size(data[: len(data) // 2], orient=False) is None  # truncated: PIL names the error
    # A file that passes the header check but that libjpeg refuses: decoded by PIL in the main process.
    corrupt = data[:200] + bytes(len(data) - 202) + data[-2:]
    source = DeviceDecodeViews(write_folder(tmp_path / "images"), _transform(convnext), 1)
    first = source[0]
    assert isinstance(first, EncodedView)
    broken = replace(first, data=torch.frombuffer(bytearray(corrupt), dtype=torch.uint8))
    pixels = source.device_pixels(collate_views([broken, source[1]]), on).cpu()
    assert torch.equal(pixels[0], source.pil_pixels(first.entry))


def test_an_adobe_marked_rgb_jpeg_goes_to_pil(tmp_path) -> None:
    buffer = io.BytesIO()
    _picture(24, 16, 3).save(buffer, "JPEG")
    plain = buffer.getvalue()
    for transform, expected in ((0, None), (1, (24, 16))):  # 0: "not YCbCr"; 1: YCbCr, as JFIF
        segment = b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform)
        marked = plain[:2] + b"\xff\xee" + struct.pack(">H", len(segment) + 2) + segment + plain[2:]
        assert jpeg_size(marked, orient=True) == expected
    assert jpeg_size(plain, orient=True) == (24, 16)


def test_a_batch_crosses_from_a_worker_with_one_tensor_of_bytes(folder, convnext) -> None:
    source = DeviceDecodeViews(folder, _transform(convnext), 2)
    items = [source[e] for e in range(len(source))]
    batch = collate_views(items)
    encoded = [item for item in items if isinstance(item, EncodedView)]
    assert [bytes(b.numpy()) for b in batch.file_bytes()] == [bytes(item.data.numpy()) for item in encoded]
    tensors = [name for name, value in vars(batch).items() if isinstance(value, torch.Tensor)]
    assert tensors == ["pixels", "files"]  # the per-file records carry no tensor
    assert not any(isinstance(v, torch.Tensor) for view in batch.encoded for v in vars(view).values())
    loader = DataLoader(source, batch_size=len(source), num_workers=1, collate_fn=collate_views)
    (crossed,) = list(loader)
    assert crossed.ends == batch.ends and torch.equal(crossed.files, batch.files)
    assert torch.equal(source.device_pixels(crossed, CPU), source.device_pixels(batch, CPU))


def test_a_batch_the_decoder_refuses_whole_is_pil_decoded_and_said_once(
    folder, convnext, monkeypatch, caplog
) -> None:
    def refuse(data, device):
        raise RuntimeError("nvjpeg: not available")

    monkeypatch.setattr(decode, "_decode", refuse)
    source = DeviceDecodeViews(folder, _transform(convnext), 1)
    encoded = [item for item in (source[e] for e in range(len(source))) if isinstance(item, EncodedView)]
    with caplog.at_level("WARNING", logger="protoquant.cache.decode"):
        for _ in range(2):
            pixels = source.device_pixels(collate_views(encoded), CPU)
    assert torch.equal(pixels, torch.stack([source.pil_pixels(item.entry) for item in encoded]))
    warnings = [r for r in caplog.records if "refused all" in r.getMessage()]
    assert len(warnings) == 1 and f"refused all {len(encoded)} files" in warnings[0].getMessage()


@pytest.mark.parametrize("on", DEVICES, ids=str)
def test_a_device_decoded_cache_has_its_own_key_and_is_complete(folder, convnext, cache_config, on) -> None:
    # 12 entries in batches of 4: on CUDA each batch is decoded on the decode stream while the
    # backbone still runs over the one before
    transform = _transform(convnext)
    assert decode_site("auto", CPU, folder) == "workers" and decode_site("device", CPU, folder) == "device"
    workers = build_cache(folder, convnext, transform, views=2, config=cache_config)
    config = replace(cache_config, decode="device")
    moved = copy.deepcopy(convnext)  # build_cache moves the backbone it is given to `on`
    device = build_cache(folder, moved, transform, views=2, config=config, device=on)
    assert workers.folder != device.folder and read_manifest(device.folder)["complete"]
    reopened = FeatureStore(device.folder, labels=folder.labels)  # verifies every shard
    assert len(reopened) == 2 * len(folder)
    key = read_manifest(device.folder)["key"]
    assert key["decode"] == "device" and "decode" not in read_manifest(workers.folder)["key"]
    digest = stable_hash(cache_key(folder, convnext, transform, 2, cache_config, decode="device"))
    assert read_manifest(device.folder)["digest"] == digest
    assert read_manifest(workers.folder)["digest"] == stable_hash(
        cache_key(folder, convnext, transform, 2, cache_config)
    )
    cosine = F.cosine_similarity(workers.get(workers.entries()), device.get(device.entries()), dim=1)
    assert cosine.min() >= MIN_PATCH_COSINE


def test_in_memory_and_png_datasets_decode_in_the_workers(tiny_synthetic, folder, tmp_path) -> None:
    assert decode_site("device", CPU, tiny_synthetic) == "workers"
    pngs = tmp_path / "pngs" / "train" / "a"
    pngs.mkdir(parents=True)
    _picture(30, 20, 0).save(pngs / "x.png")
    assert (
        decode_site("device", CPU, ImageFolder(pngs.parent.parent, "train", test_fraction=0.0)) == "workers"
    )
    assert decode_site("device", CPU, folder.subset([4])) == "workers"  # b_plain.png alone
    assert decode_site("device", CPU, folder.subset([4, 0])) == "device"
    with pytest.raises(ConfigError, match="cache.decode"):
        decode_site("gpu", CPU, tiny_synthetic)


@pytest.mark.parametrize("on", DEVICES, ids=str)
def test_a_batch_of_pil_views_only_and_of_device_views_only(folder, convnext, on) -> None:
    source = DeviceDecodeViews(folder, _transform(convnext), 1)
    items = [source[e] for e in range(len(source))]
    for kind in (DecodedView, EncodedView):
        chosen = [i for i in items if isinstance(i, kind)]
        pixels = source.device_pixels(collate_views(chosen), on).cpu()
        expected = torch.stack([source.pil_pixels(i.entry) for i in chosen])
        assert pixels.shape == expected.shape and _levels(pixels, expected).mean() <= MEAN_LEVELS


class Gray(ImageFolder):
    """A loader that changes the images it reads: its files are not what it returns."""

    def load_image(self, index: int) -> Image.Image:
        return super().load_image(index).convert("L").convert("RGB")


def test_only_loaders_that_return_the_plain_file_offer_it(tmp_path, folder) -> None:
    cub = write_cub(tmp_path / "cub")
    plain, cropped = CUB200(cub, "train"), CUB200(cub, "train", crop_to_box=True)
    assert plain.image_file(0) == ImageFile(plain.image_path(0), orient=False)  # CUB boxes: stored pixels
    assert cropped.image_file(0) is None and decode_site("device", CPU, cropped) == "workers"
    cars = StanfordCars(write_cars(tmp_path / "cars"), "train")
    assert cars.image_file(0).orient is False
    assert folder.image_file(2) == ImageFile(folder.image_path(2), orient=True)
    assert folder.subset([2, 0]).image_file(0) == folder.image_file(2)
    assert Gray(folder.root.parent, "train").image_file(0) is None
