"""What the head recomputes on every call: unit prototypes and the effective class weights.

The head keeps no memo of derived tensors (a memo keyed on tensor identity and version returned
stale weights after `weight.data = ...`); this measures what recomputing them costs next to a
whole head forward. B=32, K=1024, D=1280, 7x7, C=200 on the CPU, medians of 20 calls.

    python benchmarks/head_recompute.py [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import machine, median_seconds

from protoquant.head import ProtoQuantHead


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    head = ProtoQuantHead(torch.randn(1024, 1280, generator=generator), 200)
    features = torch.randn(32, 1280, 7, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        forward = 1e3 * median_seconds(lambda: head(features), 20)
        derived = 1e3 * median_seconds(
            lambda: (F.normalize(head.codebook, dim=1), head.class_layer.effective_weight), 20
        )
    print(f"machine: {machine()}")
    print("| head forward | recomputed per call | share |\n|---|---|---|")
    print(f"| {forward:.2f} ms | {derived:.3f} ms | {100 * derived / forward:.2f} % |")


if __name__ == "__main__":
    main()
