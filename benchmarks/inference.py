"""Benchmark 2: inference images/s, backbone alone vs backbone + ProtoQuant head.

The head (K prototypes) is the same computation a trained model runs: cosine similarity to
every prototype, softmax over prototypes, spatial max, non-negative class layer. The
backbone (on a batch of images) and the head (on that batch's feature maps) are timed
alternately, `--repeats` times each; overhead = median head time / median backbone time,
which is robust to the load of a shared machine. An end-to-end check times backbone + head
as one call the same way. Non-default backbones use random weights: their speed does not
depend on the weight values.

    python benchmarks/inference.py [--codes 2048] [--batch 32] [--repeats 21] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, sync

from protoquant.backbones.frozen import create_backbone
from protoquant.config import BackboneConfig
from protoquant.head import ProtoQuantHead

BACKBONES = (
    ("torchvision/mobilenet_v2", "default"),
    ("torchvision/resnet50", "none"),
    ("timm/convnext_tiny", "none"),
)


def _timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_parts(backbone, head, images: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Median seconds per batch of (backbone, head on its features, backbone + head), interleaved."""
    device = images.device
    features = backbone(images)
    calls = (lambda: backbone(images), lambda: head(features), lambda: head(backbone(images)))
    for call in calls:  # warm-up (kernel selection, caches)
        _timed(call, device)
    times = ([], [], [])
    for _ in range(repeats):
        for call, bucket in zip(calls, times):
            bucket.append(_timed(call, device))
    return tuple(statistics.median(bucket) for bucket in times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}; batch {args.batch}, K={args.codes}, fp32, channels_last")
    print("| backbone | D x H x W | backbone img/s | head ms/batch | head overhead | end-to-end img/s |")
    print("|---|---|---|---|---|---|")
    images = torch.randn(args.batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for name, weights in BACKBONES:
            backbone = create_backbone(BackboneConfig(name=name, weights=weights)).to(device)
            backbone = backbone.to(memory_format=torch.channels_last)
            info = backbone.info
            head = ProtoQuantHead(torch.randn(args.codes, info.channels), 200).to(device)
            alone, head_only, full = time_parts(backbone, head, images, args.repeats)
            shape = f"{info.channels} x {info.grid[0]} x {info.grid[1]}"
            print(
                f"| {name} | {shape} | {args.batch / alone:.1f} | {1000 * head_only:.2f} | "
                f"{100 * head_only / alone:.1f} % | {args.batch / full:.1f} |"
            )


if __name__ == "__main__":
    main()
