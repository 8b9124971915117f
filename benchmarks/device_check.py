"""Check that caching on an accelerator gives the features the CPU gives.

Caches the same synthetic images on the CPU and on `--device` (fp32, several shards and a
batch size that does not divide the shard size, so the one-batch-late collection crosses
shard boundaries) and compares them, then compares a random ProtoQuant head's predictions
on both caches. Exits non-zero when they disagree beyond fp16 storage precision.

    python benchmarks/device_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch.nn.functional as F
from common import machine

from protoquant.backbones.frozen import create_backbone
from protoquant.cache.build import build_cache
from protoquant.config import BackboneConfig, CacheConfig
from protoquant.data import SyntheticParts
from protoquant.data.transforms import ViewTransform
from protoquant.head import ProtoQuantHead


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    dataset = SyntheticParts("test", num_classes=10, images_per_class=args.images // 10, seed=5)
    backbone = create_backbone(BackboneConfig())
    transform = ViewTransform(224, 1.0, backbone.info.mean, backbone.info.std)
    caches = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device in ("cpu", args.device):
            config = CacheConfig(f"{tmp}/{device}", shard_size=40, batch_size=16, num_workers=2)
            store = build_cache(dataset, backbone, transform, views=2, config=config, device=device)
            caches[device] = (store.get(store.entries()), store.pooled().clone())
    (cpu, cpu_pooled), (acc, acc_pooled) = caches["cpu"], caches[args.device]
    relative = float((acc - cpu).norm() / cpu.norm())
    cosine = float(F.cosine_similarity(acc, cpu, dim=1).min())
    pooled_relative = float((acc_pooled - cpu_pooled).norm() / cpu_pooled.norm())
    head = ProtoQuantHead(cpu.permute(0, 2, 3, 1).reshape(-1, cpu.shape[1])[::97][:256], 10)
    agree = float((head(cpu).logits.argmax(1) == head(acc).logits.argmax(1)).float().mean())
    print(f"machine: {machine()}; {len(cpu)} cached views on cpu and {args.device}")
    print(f"features: relative error {relative:.2e}, min patch cosine {cosine:.5f}; pooled relative error "
          f"{pooled_relative:.2e}; head predictions agree on {100 * agree:.1f} %")  # fmt: skip
    ok = relative < 5e-3 and cosine > 0.99 and pooled_relative < 5e-3 and agree >= 0.97
    print("device check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
