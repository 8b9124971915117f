"""Views of a decoded batch: one image at a time (`apply_geometry`) against the whole batch as matrix
products (`resample_views`, what device decoding uses on CUDA; in full float32, from TF32 products
of split operands, and in plain TF32), side by side.

A batch of `--batch` smooth random uint8 images, sizes drawn within 20 % of `--size`, already on
the device (as the JPEG decoder leaves them), with the geometries of `ViewTransform` (view 0 and
augmented views, alternating). For each way: the median time until the call returns (the host's
share: on CUDA the main process must issue the work of a batch faster than the backbone runs one)
and until the device has finished it, the tensor operations one batch dispatches, and the largest
difference between the two ways' pixels.

    python benchmarks/view_geometry.py [--device cuda] [--batch 128] [--size 500x375] [--side 224]
        [--interpolation bicubic] [--emulate-tf32]

`--emulate-tf32` makes every product act as TF32 hardware that truncates its operands, to measure
the three ways' accuracy on a machine without TF32 (its times mean nothing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from common import machine, sync

from protoquant.cache.decode import apply_geometry
from protoquant.cache.resample import PRODUCTS, resample_views, tf32_parts
from protoquant.data.transforms import ViewTransform


def make_batch(args: argparse.Namespace, device: torch.device) -> tuple[list, list, ViewTransform]:
    rng = np.random.default_rng(0)
    width, height = (int(v) for v in args.size.split("x"))
    transform = ViewTransform(
        args.side, 0.875, (0.5,) * 3, (0.5,) * 3, seed=0, interpolation=args.interpolation
    )
    images, geometries = [], []
    for index in range(args.batch):
        w, h = (int(v * rng.uniform(0.8, 1.2)) for v in (width, height))
        noise = torch.from_numpy(rng.uniform(0, 255, size=(1, 3, h, w)).astype(np.float32))
        images.append(F.avg_pool2d(noise, 5, 1, 2)[0].round().to(torch.uint8).to(device))  # (3, h, w)
        geometries.append(transform.geometry(w, h, index, index % 3))
    return images, geometries, transform


def one_by_one(images: list, geometries: list, transform: ViewTransform) -> torch.Tensor:
    side = transform.image_size
    out = torch.empty(len(images), 3, side, side, dtype=torch.uint8, device=images[0].device)
    for row, (image, geometry) in enumerate(zip(images, geometries)):
        out[row] = apply_geometry(image, geometry, transform.mode)
    return out


def timed(fn, device: torch.device, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(median seconds until `fn` returns, median seconds until the device is done, its output)."""
    out = fn()  # warm-up
    sync(device)
    returned, done = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        returned.append(time.perf_counter() - start)
        sync(device)
        done.append(time.perf_counter() - start)
    return statistics.median(returned), statistics.median(done), out


def dispatched(fn, device: torch.device) -> str:
    """What one call dispatches: `aten::` calls (views and the ones inside others included), each
    of which costs host time that queued kernels do not hide, and on CUDA the kernels launched."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        sync(device)
    events = profile.events()
    calls = sum(event.name.startswith("aten::") for event in events)
    if device.type != "cuda":
        return f"{calls}"
    kernels = sum(event.device_type == torch.autograd.DeviceType.CUDA for event in events)
    return f"{calls} ({kernels} kernels)"


def emulate_truncating_tf32() -> None:
    """Make torch.bmm behave, wherever TF32 is allowed (float32 matmul precision below "highest"),
    as TF32 hardware that truncates its operands to 10 mantissa bits (the worse of the two
    roundings), to see the products' accuracy on a machine without TF32."""
    bmm = torch.bmm

    def truncated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if torch.get_float32_matmul_precision() == "highest":
            return bmm(a, b)
        return bmm(tf32_parts(a)[0], tf32_parts(b)[0])  # the part TF32 holds

    torch.bmm = truncated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the sources (each within 20 %%)")
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument(
        "--emulate-tf32",
        action="store_true",
        help="every bmm as truncating TF32 (accuracy only; times mean nothing)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.emulate_tf32:
        emulate_truncating_tf32()
    images, geometries, transform = make_batch(args, device)
    print(f"machine: {machine()}; device {device}")
    print(
        f"batch {args.batch}, sources about {args.size}, side {args.side}, {args.interpolation}, median of {args.repeats}"
    )
    ways = {"one image at a time": lambda: one_by_one(images, geometries, transform)}
    for products in PRODUCTS:
        ways[f"batch as matrix products, {products}"] = partial(
            resample_views, images, geometries, args.interpolation, products=products
        )
    results = {name: timed(fn, device, args.repeats) for name, fn in ways.items()}
    print(
        "| way | returns after (ms / batch) | done after (ms / batch) | us / image (done) | aten calls / batch |"
    )
    print("|---|---|---|---|---|")
    for name, (returned, done, _) in results.items():
        ops = dispatched(ways[name], device)
        print(f"| {name} | {returned * 1e3:.2f} | {done * 1e3:.2f} | {done / args.batch * 1e6:.1f} | {ops} |")
    reference_returned, reference_done, reference = results["one image at a time"]
    for name, (returned, done, out) in list(results.items())[1:]:
        levels = (out.int() - reference.int()).abs()
        print(
            f"{name} / one at a time: returns {returned / reference_returned:.2f}x, done "
            f"{done / reference_done:.2f}x; pixels: max difference {int(levels.max())} level(s), "
            f"{float((levels > 0).float().mean()):.2e} of values differ"
        )


if __name__ == "__main__":
    main()
