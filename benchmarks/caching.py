"""Benchmark 3: caching throughput vs the bare backbone forward pass; bf16 autocast vs fp32.

Caching is the real `build_cache` reading JPEG files from disk: decode + transform in
DataLoader workers, normalisation and backbone on the device, fp16 shard writes on a
background thread. Bare is the backbone alone on a ready batch of the same size, already on
the device. The two alternate for `--rounds` rounds (a fresh cache each time) and the
ratio of medians is reported, which is robust to the load of a shared machine. With
`--bf16` it also caches under bf16 autocast and compares the features with fp32 (mean
patch cosine, and linear-probe accuracy trained on each). With `--decode both` it caches the
same images with the JPEG files decoded by PIL in the workers and decoded in batches on the
device (`cache.decode`), side by side, and compares the two caches the same way. With
`--resized PX` it also writes a copy of the images with `protoquant data resize` (shorter side
PX, timed once) and caches that copy (decoded in the workers) beside the originals.

    python benchmarks/caching.py [--images 256] [--rounds 3] [--workers 0,-1] [--device cuda] [--bf16]
        [--decode workers|device|both] [--resized 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, sync

from protoquant.backbones.frozen import create_backbone
from protoquant.cache.build import build_cache, loader_workers
from protoquant.cache.view import CacheView
from protoquant.config import BackboneConfig, CacheConfig, ProbeConfig
from protoquant.data import SyntheticParts
from protoquant.data.image_folder import ImageFolder
from protoquant.data.resize import resize_dataset
from protoquant.data.splits import stratified_split
from protoquant.data.transforms import ViewTransform
from protoquant.train.probe import evaluate_probe, train_probe

CLASSES = 8
RESIZED = "resized"  # the `decode` label of the cached downscaled copy (decoded in the workers)


def write_jpegs(root: Path, count: int, size: tuple[int, int]) -> ImageFolder:
    """`count` synthetic images saved as JPEG files (quality 90) in root/{train,test}/<class>/."""
    source = SyntheticParts("train", num_classes=CLASSES, images_per_class=-(-count // CLASSES), seed=3)
    for i in range(count):
        for split in ("train", "test") if i < CLASSES else ("train",):
            folder = root / split / source.classes[source.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            source.load_image(i).resize(size).save(folder / f"{i:05d}.jpg", quality=90)
    return ImageFolder(root, "train")


def bare_rate(backbone, count: int, batch: int, device: torch.device, bf16: bool) -> float:
    images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    steps = max(1, count // batch)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        backbone(images)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            backbone(images)
        sync(device)
    return steps * batch / (time.perf_counter() - start)


def cache_rate(dataset, backbone, transform, device, config: CacheConfig):
    """(images/s, store) of one fresh caching run into config.root."""
    start = time.perf_counter()
    store = build_cache(dataset, backbone, transform, views=1, config=config, device=device)
    return len(dataset) / (time.perf_counter() - start), store


def probe_accuracy(store) -> float:
    """Linear probe on 70 % of the images, accuracy on the rest (same split for every store)."""
    train, held = stratified_split(store.labels, 0.3, seed=0)
    cpu = torch.device("cpu")
    probe = train_probe(
        CacheView(store, train), CacheView(store, held), CLASSES, ProbeConfig(epochs=60), seed=0, device=cpu
    )
    return evaluate_probe(probe, CacheView(store, held), cpu)


def report(
    results: dict, settings: list[tuple[int, str]], precisions: tuple[bool, ...], images: int, batch: int
):
    print("| precision | workers | decode | bare forward img/s | caching img/s | ratio (target >= 0.9) |")
    print("|---|---|---|---|---|---|")
    auto = loader_workers(CacheConfig(batch_size=batch), images)
    for bf16 in precisions:
        bare = statistics.median(results[("bare", bf16)])
        for workers, decode in settings:
            rate = statistics.median(results[(workers, decode, bf16)])
            shown = f"auto ({auto})" if workers < 0 else str(workers)
            precision = "bf16" if bf16 else "fp32"
            print(f"| {precision} | {shown} | {decode} | {bare:.1f} | {rate:.1f} | {rate / bare:.2f} |")
        for workers in dict.fromkeys(w for w, _ in settings):
            for other in ("device", RESIZED):
                if (workers, other, bf16) in results and (workers, "workers", bf16) in results:
                    rate = statistics.median(results[(workers, other, bf16)])
                    host = statistics.median(results[(workers, "workers", bf16)])
                    print(f"decode {other} / workers caching rate, workers {workers}: {rate / host:.2f}")


def compare_bf16(fp32, bf16) -> None:
    """Mean patch cosine between the two caches, and a linear probe trained on each."""
    cosine = F.cosine_similarity(fp32.get(fp32.entries()), bf16.get(bf16.entries()), dim=1).mean()
    accuracy = probe_accuracy(fp32), probe_accuracy(bf16)
    print(
        f"bf16 vs fp32 features: mean patch cosine {cosine:.4f}; probe held-out accuracy fp32 "
        f"{accuracy[0]:.3f}, bf16 {accuracy[1]:.3f}"
    )


def compare_decode(workers, other, name: str = "device") -> None:
    """Patch cosine between the caches decoded in the workers and another way (`name`), and a
    probe on each."""
    cosine = F.cosine_similarity(workers.get(workers.entries()), other.get(other.entries()), dim=1)
    accuracy = probe_accuracy(workers), probe_accuracy(other)
    print(
        f"{name} vs workers decode features: patch cosine min {cosine.min():.4f}, mean {cosine.mean():.5f}; "
        f"probe held-out accuracy workers {accuracy[0]:.3f}, {name} {accuracy[1]:.3f}"
    )


def decode_rate(dataset, transform: ViewTransform) -> float:
    """Images/s of reading, decoding and transforming `dataset` in this process (no backbone)."""
    start = time.perf_counter()
    for i in range(len(dataset)):
        transform(dataset.load_image(i), i, 0)
    return len(dataset) / (time.perf_counter() - start)


def write_resized(images: Path, copy: Path, shorter_side: int) -> ImageFolder:
    """The downscaled copy of `images` (timed: a one-time cost) as a dataset."""
    start = time.perf_counter()
    report = resize_dataset(images, copy, shorter_side)
    seconds = time.perf_counter() - start
    count = report.resized + report.copied
    print(
        f"data resize to {shorter_side} px: {count} images in {seconds:.1f} s ({count / seconds:.1f} img/s, once)"
    )
    return ImageFolder(copy, "train")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="500x375", help="JPEG width x height (CUB-like by default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="0,-1", help="DataLoader workers to compare; -1 = automatic")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="also cache under bf16 autocast and compare")
    parser.add_argument("--decode", default="workers", choices=["workers", "device", "both"])
    parser.add_argument("--backbone", default="torchvision/mobilenet_v2", help="others use random weights")
    parser.add_argument("--resized", type=int, default=0, help="also cache a copy at this shorter side (px)")
    return parser.parse_args()


def measure(args, tmp: str, sources: dict, backbone, transform, settings, precisions) -> tuple[dict, dict]:
    """(rates, stores): bare and caching rates of every setting, `args.rounds` rounds alternating."""
    device, results, stores = torch.device(args.device), {}, {}
    for round_ in range(args.rounds):
        for bf16 in precisions:
            rate = bare_rate(backbone, args.images, args.batch, device, bf16)
            results.setdefault(("bare", bf16), []).append(rate)
            for workers, decode in settings:
                config = CacheConfig(
                    f"{tmp}/cache-{round_}-{workers}-{decode}",
                    num_workers=workers,
                    batch_size=args.batch,
                    autocast_bf16=bf16,
                    decode="workers" if decode == RESIZED else decode,
                )
                rate, stores[(decode, bf16)] = cache_rate(
                    sources[decode], backbone, transform, device, config
                )
                results.setdefault((workers, decode, bf16), []).append(rate)
    return results, stores


def report_decoding(original, copy, transform: ViewTransform, rounds: int, shorter_side: int) -> None:
    """Decoding alone from the originals and from the copy, median of `rounds` alternating."""
    rates = [(decode_rate(original, transform), decode_rate(copy, transform)) for _ in range(rounds)]
    before, after = (statistics.median(r[k] for r in rates) for k in (0, 1))
    print(
        f"decode + transform alone, one process: originals {before:.1f} img/s, copy at "
        f"{shorter_side} px {after:.1f} img/s ({after / before:.2f}x)"
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    weights = "default" if args.backbone == "torchvision/mobilenet_v2" else "none"
    backbone = create_backbone(BackboneConfig(name=args.backbone, weights=weights))
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    transform = ViewTransform(224, 1.0, backbone.info.mean, backbone.info.std)
    decodes = ["workers", "device"] if args.decode == "both" else [args.decode]
    decodes += [RESIZED] if args.resized else []
    settings = [(int(w), decode) for w in args.workers.split(",") for decode in decodes]
    precisions = (False, True) if args.bf16 else (False,)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_jpegs(Path(tmp) / "images", args.images, tuple(int(v) for v in args.size.split("x")))
        print(f"machine: {machine()}; device {device}")
        sources = {d: dataset for d in decodes}
        if args.resized:
            sources[RESIZED] = write_resized(Path(tmp) / "images", Path(tmp) / "resized", args.resized)
        print(
            f"{len(dataset)} JPEG files {args.size}, {args.backbone} 224 px, batch {args.batch}, {args.rounds} rounds"
        )
        results, stores = measure(args, tmp, sources, backbone, transform, settings, precisions)
        report(results, settings, precisions, len(dataset), args.batch)
        if args.resized:
            report_decoding(dataset, sources[RESIZED], transform, args.rounds, args.resized)
        if args.bf16:
            compare_bf16(stores[(decodes[0], False)], stores[(decodes[0], True)])
        if args.decode == "both":
            compare_decode(stores[("workers", False)], stores[("device", False)])
        if args.resized and ("workers", False) in stores:
            compare_decode(stores[("workers", False)], stores[(RESIZED, False)], f"copy at {args.resized} px")


if __name__ == "__main__":
    main()
