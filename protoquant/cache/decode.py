"""JPEG decoding on the run's device, in batches, for feature caching (`cache.decode`).

The DataLoader workers only read each view's file bytes and work out its geometry (the crop
box in source pixels, resize, flip) with `ViewTransform.geometry`, the same seeded function
`ViewTransform.pixels` follows, so both sites crop the same region of the same image. The main
process then decodes the whole batch with `torchvision.io.decode_jpeg` (nvJPEG on CUDA,
libjpeg on the CPU), crops, resizes with antialiasing and flips on the device; on CUDA it does so
on a stream of its own, while the backbone runs over the previous batch.

Only plain JPEG files go this way (`ImageDataset.image_file` gives one): baseline or progressive,
grayscale or RGB, without an EXIF rotation that `load_image` would apply, ending in the JPEG end
marker. Every other image (PNG, CMYK, an Adobe-marked RGB file, a rotated phone photo, a box crop,
an in-memory image, a file the decoder refuses) is decoded by PIL exactly as with decode =
'workers', in the worker or, when the device decoder refuses it, in the main process; one batch
may mix both kinds. A batch whose every file the device decoder refuses is logged as a warning
(once): the run is then correct but decodes with PIL on one main-process thread.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from protoquant.cache.resample import FILTERS, products_for, resample_views
from protoquant.data.base import ImageDataset, ImageFile
from protoquant.data.images import DECODE_ERRORS
from protoquant.data.transforms import ViewGeometry, ViewTransform
from protoquant.errors import ConfigError

logger = logging.getLogger(__name__)

SITES = ("workers", "device")  # where images are decoded, once `auto` is resolved
JPEG_START = b"\xff\xd8\xff"  # SOI marker + the first segment's marker prefix
JPEG_END = b"\xff\xd9"  # EOI marker: a file without it is truncated or carries trailing data
DEVICE_MODES = ("L", "RGB")  # JPEG colour modes decoded on the device (CMYK goes to PIL)
ORIENTATION_TAG = 0x0112  # EXIF orientation; 1 = stored upright
JPEG_SUFFIXES = (".jpg", ".jpeg")
SITE_SAMPLES = 16  # images of a dataset looked at (names only) to decide whether any is a JPEG file
DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


def decode_site(requested: str, device: torch.device, dataset: ImageDataset) -> str:
    """'workers' or 'device' for config `cache.decode` = `requested` on `device`.

    'auto' is 'device' on CUDA, else 'workers'. A dataset whose sampled images (SITE_SAMPLES,
    spread over it) include no plain JPEG file by name (in-memory images, box crops, PNG
    datasets) decodes in the workers whatever was requested: its cache keeps the workers' key.
    """
    if requested not in (*SITES, "auto"):
        raise ConfigError(f"cache.decode must be one of {[*SITES, 'auto']}, got {requested!r}")
    site = ("device" if device.type == "cuda" else "workers") if requested == "auto" else requested
    if site == "device" and not _has_jpeg_files(dataset):
        logger.info("%s/%s has no plain JPEG files: decoding in the workers", dataset.name, dataset.split)
        return "workers"
    return site


def _has_jpeg_files(dataset: ImageDataset) -> bool:
    count = min(len(dataset), SITE_SAMPLES)
    sampled = np.linspace(0, len(dataset) - 1, count).round().astype(int) if count else []
    files = [dataset.image_file(int(i)) for i in sampled]
    return any(f is not None and f.path.suffix.lower() in JPEG_SUFFIXES for f in files)


@dataclass(frozen=True)
class DecodedView:
    """A view the worker decoded with PIL: (3, S, S) uint8 pixels of entry `entry`."""

    entry: int
    pixels: torch.Tensor


@dataclass(frozen=True)
class FileView:
    """A view to decode on the device, without the file's bytes: its entry, the file's size and
    where the view lies in it."""

    entry: int
    width: int
    height: int
    geometry: ViewGeometry


@dataclass(frozen=True)
class EncodedView(FileView):
    """A view to decode on the device with the file's bytes ((N,) uint8), as a worker returns it."""

    data: torch.Tensor


@dataclass(frozen=True)
class ViewBatch:
    """A collated batch of B entries: `pixels` ((n, 3, S, S) uint8) fill rows `decoded_rows`, the
    `encoded` views (decoded on the device) fill rows `encoded_rows`.

    The bytes of every file to decode lie one after another in `files` ((N,) uint8), file i
    ending at `ends[i]`: a batch then crosses from a worker to the main process as one tensor,
    not as one shared-memory handle per file (`benchmarks/batch_transfer.py`).
    """

    entries: tuple[int, ...]
    decoded_rows: tuple[int, ...]
    pixels: torch.Tensor
    encoded_rows: tuple[int, ...]
    encoded: tuple[FileView, ...]
    files: torch.Tensor
    ends: tuple[int, ...]

    def file_bytes(self) -> list[torch.Tensor]:
        """(N_i,) uint8 bytes of each encoded view's file: views of `files`."""
        return [self.files[start:end] for start, end in zip((0, *self.ends[:-1]), self.ends)]

    def pin_memory(self) -> ViewBatch:
        """The DataLoader's pin_memory hook: pins the decoded pixels (the bytes stay pageable)."""
        return replace(self, pixels=self.pixels.pin_memory()) if self.decoded_rows else self


def collate_views(items: list[DecodedView | EncodedView]) -> ViewBatch:
    """Collate mixed items into a `ViewBatch`, keeping their order as batch rows."""
    decoded = [(row, item) for row, item in enumerate(items) if isinstance(item, DecodedView)]
    encoded = [(row, item) for row, item in enumerate(items) if isinstance(item, EncodedView)]
    empty = torch.empty(0, dtype=torch.uint8)
    pixels = torch.stack([item.pixels for _, item in decoded]) if decoded else empty
    files = torch.cat([item.data for _, item in encoded]) if encoded else empty
    return ViewBatch(
        tuple(item.entry for item in items),
        tuple(row for row, _ in decoded),
        pixels,
        tuple(row for row, _ in encoded),
        tuple(FileView(item.entry, item.width, item.height, item.geometry) for _, item in encoded),
        files,
        tuple(np.cumsum([len(item.data) for _, item in encoded]).tolist()),
    )


def jpeg_size(data: bytes, orient: bool) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder takes as `load_image` would read it, else None.

    None for anything else: not a complete JPEG, CMYK, three channels under an Adobe marker that
    says they are not YCbCr (libjpeg and PIL read such files in their own ways, nvJPEG in its
    own), or rotated by an EXIF tag that `orient` says `load_image` applies. Only the header is
    parsed.
    """
    if not data.startswith(JPEG_START) or not data.endswith(JPEG_END):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in DEVICE_MODES:
                return None
            if image.info.get("adobe_transform") == 0 and image.mode == "RGB":
                return None  # an Adobe marker without colour transform: decoders differ on it
            if orient and image.getexif().get(ORIENTATION_TAG, 1) != 1:
                return None
            return image.size
    except DECODE_ERRORS:
        return None  # PIL reads the file again in `load_image` and names the error there


def read_jpeg(file: ImageFile) -> tuple[torch.Tensor, int, int] | None:
    """((N,) uint8 bytes, width, height) of a file for the device decoder, or None (see `jpeg_size`)."""
    try:
        data = file.path.read_bytes()
    except OSError:
        return None  # `load_image` raises the error that names the file
    size = jpeg_size(data, file.orient)
    if size is None:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), *size


class DeviceDecodeViews(Dataset):
    """Entry e of an ImageDataset (image e // views, view e % views) as an `EncodedView` when its
    file can be decoded on the device, else as a `DecodedView` decoded by PIL in the worker."""

    def __init__(self, dataset: ImageDataset, transform: ViewTransform, views: int) -> None:
        self.dataset, self.transform, self.views = dataset, transform, views
        self.warned = False  # whether a batch refused whole was logged (once per run)

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def __getitem__(self, entry: int) -> DecodedView | EncodedView:
        index, view = divmod(entry, self.views)
        file = self.dataset.image_file(index)
        read = read_jpeg(file) if file is not None else None
        if read is None:
            return DecodedView(entry, self.pil_pixels(entry))
        data, width, height = read
        return EncodedView(entry, width, height, self.transform.geometry(width, height, index, view), data)

    def pil_pixels(self, entry: int) -> torch.Tensor:
        """(3, S, S) uint8 pixels of `entry` by the workers path (PIL)."""
        index, view = divmod(entry, self.views)
        return self.transform.pixels(self.dataset.load_image(index), index, view)

    def device_pixels(self, batch: ViewBatch, device: torch.device) -> torch.Tensor:
        """(B, 3, S, S) uint8 pixels of a collated batch, on `device`.

        On CUDA the batch is decoded on a stream of its own, so that its decoding overlaps the
        backbone still running on the caller's stream over the previous batch; the caller's
        stream waits for the pixels, and their memory is not reused before it has read them.
        """
        if device.type != "cuda":
            return self._pixels(batch, device)
        consumer, stream = torch.cuda.current_stream(device), decode_stream(device)
        with torch.cuda.stream(stream):
            out = self._pixels(batch, device)
        consumer.wait_stream(stream)
        out.record_stream(consumer)
        return out

    def _pixels(self, batch: ViewBatch, device: torch.device) -> torch.Tensor:
        side = self.transform.image_size
        out = torch.empty(len(batch.entries), 3, side, side, dtype=torch.uint8, device=device)
        if batch.decoded_rows:
            out[list(batch.decoded_rows)] = batch.pixels.to(device, non_blocking=True)
        images = decode_jpegs(batch.file_bytes(), device)
        decoded: list[tuple[int, torch.Tensor, ViewGeometry]] = []  # (row, image, geometry)
        for row, item, image in zip(batch.encoded_rows, batch.encoded, images):
            if image is None or tuple(image.shape) != (3, item.height, item.width):
                logger.debug("entry %d: the device decoder refused it; decoding it with PIL", item.entry)
                out[row] = self.pil_pixels(item.entry).to(device)
            else:
                decoded.append((row, image, item.geometry))
        if decoded:
            self._views(decoded, out)
        refused = len(batch.encoded) - len(decoded)
        if refused == len(batch.encoded) > 0 and not self.warned:
            logger.warning(
                "the %s JPEG decoder refused all %d files of a batch (e.g. entry %d); they are decoded "
                "by PIL in the main process, one at a time: set cache.decode workers if this goes on",
                device.type, refused, batch.encoded[0].entry,
            )  # fmt: skip
            self.warned = True
        return out

    def _views(self, decoded: list[tuple[int, torch.Tensor, ViewGeometry]], out: torch.Tensor) -> None:
        """out[row] = the view of each decoded image: the whole batch at once on CUDA (a fixed
        number of kernels, `resample_views`), one image at a time elsewhere, where the direct
        resize costs less than the matrix products."""
        rows, images, geometries = zip(*decoded)
        interpolation = self.transform.interpolation
        device = images[0].device
        if batched_views(device) and interpolation in FILTERS:
            out[list(rows)] = resample_views(images, geometries, interpolation, products=products_for(device))
            return
        for row, image, geometry in decoded:
            out[row] = apply_geometry(image, geometry, self.transform.mode)


def batched_views(device: torch.device) -> bool:
    """Whether the views of a batch decoded on `device` are made together (`resample_views`)."""
    return device.type == "cuda"


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, h, w) uint8 RGB images of JPEG bytes on `device`, in one batched call; None for each
    file the decoder refuses (then decoded one by one to find them)."""
    if not data:
        return []
    try:
        return list(_decode(data, device))
    except (RuntimeError, ValueError):
        images = []
        for one in data:
            try:
                images.append(_decode([one], device)[0])
            except (RuntimeError, ValueError):
                images.append(None)
        return images


@functools.cache
def decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream `DeviceDecodeViews` decodes on, one per device (made in the main process only)."""
    return torch.cuda.Stream(device)


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cuda":
        # torchvision's nvJPEG decoder writes its outputs on a private stream that does not wait
        # for the caller's (pytorch/vision#9606): memory that work queued on the current stream
        # still reads could be handed to it and overwritten. Let that work finish first; on the
        # decode stream it is only the previous batch's crops and resizes, not the backbone.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # the successor (TorchCodec) is no dependency of ours yet
        warnings.filterwarnings("ignore", message=DEPRECATION, category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def apply_geometry(image: torch.Tensor, geometry: ViewGeometry, mode: TF.InterpolationMode) -> torch.Tensor:
    """(3, h, w) uint8 source image -> (3, S, S) uint8 view: crop, antialiased resize, centre crop, flip."""
    g = geometry
    crop = image[:, g.top : g.top + g.height, g.left : g.left + g.width]  # (3, g.height, g.width)
    resized = TF.resize(crop, list(g.resize), interpolation=mode, antialias=True)
    framed = TF.center_crop(resized, [g.size, g.size])  # (3, S, S)
    return TF.hflip(framed) if g.flip else framed
