"""Benchmark 2: inference images/s, backbone alone vs backbone + ProtoQuant head.

The head (K prototypes) is the same computation a trained model runs: cosine similarity to
every prototype, softmax over prototypes, spatial max, non-negative class layer. Two heads run
side by side: "reference" (`head(features)`, which also returns the (B, K, H, W) maps that
explanations draw) and "fast" (`head.forward_logits` inside `head.inference()`: logits and
scores only, derived tensors reused); `--compile MODE` adds the fast path under torch.compile.
The backbone (on a batch of images) and each head (on that batch's feature maps) are timed
alternately, `--repeats` times each; overhead = median head time / median backbone time,
which is robust to the load of a shared machine. An end-to-end check times backbone + head
as one call the same way. Non-default backbones use random weights: their speed does not
depend on the weight values.

    python benchmarks/inference.py [--codes 2048] [--batch 32] [--repeats 21] [--device cuda]
        [--compile reduce-overhead] [--backbones mobilenet_v2,resnet50]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import machine, sync

from protoquant.backbones.frozen import create_backbone
from protoquant.config import BackboneConfig
from protoquant.head import ProtoQuantHead
from protoquant.head_fast import COMPILE_MODES

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


def time_calls(calls: list, device: torch.device, repeats: int) -> list[float]:
    """Median seconds of each call, the calls interleaved `repeats` times (after two warm-ups)."""
    for _ in range(2):  # warm-up (kernel selection, caches, compilation)
        for call in calls:
            _timed(call, device)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, bucket in zip(calls, times):
            bucket.append(_timed(call, device))
    return [statistics.median(bucket) for bucket in times]


def head_variants(codebook: torch.Tensor, compile_mode: str | None) -> dict[str, tuple]:
    """name -> (head, call on features); the fast heads are the same head object's other path."""
    head = ProtoQuantHead(codebook, 200).eval().requires_grad_(False)  # normal tensors: reusable
    variants = {"reference": (head, head.forward), "fast": (head, head.forward_logits)}
    if compile_mode is not None:
        compiled = ProtoQuantHead(codebook, 200).eval().requires_grad_(False)
        compiled.load_state_dict(head.state_dict())
        compiled.compile_logits(compile_mode, on_cpu=True)  # measured here, so on the CPU too
        variants[f"compiled {compile_mode}"] = (compiled, compiled.forward_logits)
    return variants


def run_backbone(name: str, weights: str, images: torch.Tensor, args: argparse.Namespace) -> None:
    device = images.device
    backbone = create_backbone(BackboneConfig(name=name, weights=weights)).to(device)
    backbone = backbone.to(memory_format=torch.channels_last)
    info = backbone.info
    codebook = torch.randn(args.codes, info.channels, device=device)
    variants = head_variants(codebook, args.compile)
    with contextlib.ExitStack() as scopes, torch.inference_mode():
        for head, _ in variants.values():
            scopes.enter_context(head.inference())
        features = backbone(images)
        calls = [lambda: backbone(images)]
        for _, call in variants.values():
            calls += [lambda call=call: call(features), lambda call=call: call(backbone(images))]
        alone, *rest = time_calls(calls, device, args.repeats)
    shape = f"{info.channels} x {info.grid[0]} x {info.grid[1]}"
    for label, head_only, full in zip(variants, rest[0::2], rest[1::2]):
        print(
            f"| {name}, head: {label} | {shape} | {args.batch / alone:.1f} | {1000 * head_only:.2f} | "
            f"{100 * head_only / alone:.1f} % | {args.batch / full:.1f} |"
        )


def choose_backbones(names: str, parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """The BACKBONES named in `names` (comma-separated, with or without the "library/" prefix); all
    when empty. An unknown name is an error, not an empty table."""
    if not names:
        return list(BACKBONES)
    known = {short: b for b in BACKBONES for short in (b[0], b[0].split("/")[1])}
    unknown = [n for n in names.split(",") if n not in known]
    if unknown:
        parser.error(
            f"--backbones: unknown {', '.join(unknown)}; choose from {', '.join(b[0] for b in BACKBONES)}"
        )
    return [b for b in BACKBONES if b in {known[n] for n in names.split(",")}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codes", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None, help="add a compiled fast head")
    parser.add_argument("--backbones", default="", help="comma-separated subset of the names (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    chosen = choose_backbones(args.backbones, parser)
    print(f"machine: {machine()}; device {device}; batch {args.batch}, K={args.codes}, fp32, channels_last")
    print("| backbone | D x H x W | backbone img/s | head ms/batch | head overhead | end-to-end img/s |")
    print("|---|---|---|---|---|---|")
    images = torch.randn(args.batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    for name, weights in chosen:
        run_backbone(name, weights, images, args)


if __name__ == "__main__":
    main()
