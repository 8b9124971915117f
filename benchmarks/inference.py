"""Benchmark 2: inference images/s, backbone alone vs backbone + ProtoQuant head.

The head (K prototypes) is the same computation a trained model runs: cosine similarity to
every prototype, softmax over prototypes, spatial max, non-negative class layer. Timings
are medians over repeats, the two variants alternating, at batch 32. Non-default backbones
use random weights: their speed does not depend on the weight values.

    python benchmarks/inference.py [--codes 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine

from protoquant.backbones import create_backbone
from protoquant.config import BackboneConfig
from protoquant.head import ProtoQuantHead

BACKBONES = (
    ("torchvision/mobilenet_v2", "default"),
    ("torchvision/resnet50", "none"),
    ("timm/convnext_tiny", "none"),
)


def time_pair(backbone, head, images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median seconds per batch of (backbone alone, backbone + head), interleaved."""
    alone, full = [], []
    with torch.inference_mode():
        backbone(images), head(backbone(images))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            backbone(images)
            alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            head(backbone(images))
            full.append(time.perf_counter() - start)
    return statistics.median(alone), statistics.median(full)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}; batch {args.batch}, K={args.codes}, fp32, channels_last")
    print("| backbone | D x H x W | backbone img/s | + head img/s | head overhead |")
    print("|---|---|---|---|---|")
    images = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    for name, weights in BACKBONES:
        backbone = create_backbone(BackboneConfig(name=name, weights=weights)).to(
            memory_format=torch.channels_last
        )
        info = backbone.info
        head = ProtoQuantHead(torch.randn(args.codes, info.channels), 200)
        alone, full = time_pair(backbone, head, images, args.repeats)
        shape = f"{info.channels} x {info.grid[0]} x {info.grid[1]}"
        print(
            f"| {name} | {shape} | {args.batch / alone:.1f} | {args.batch / full:.1f} | {100 * (full / alone - 1):.1f} % |"
        )


if __name__ == "__main__":
    main()
