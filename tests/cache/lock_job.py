"""What each of two processes building the same cache at once runs (tests/cache/test_lock.py runs it
itself and in a subprocess).

Usage: lock_job.py CACHE_ROOT START_DIR NAME. Waits until both processes are ready (files in
START_DIR), then builds a cache of slowly loading images, so that the builds overlap.
"""

import sys
import time
from pathlib import Path

import torch

from protoquant.backbones.frozen import create_backbone
from protoquant.cache.build import build_cache
from protoquant.config import BackboneConfig, CacheConfig
from protoquant.data.synthetic import SyntheticParts
from protoquant.data.transforms import ViewTransform

LOAD_SECONDS = 0.05  # per image: a shard of 4 takes 0.2 s, the whole cache about 1 s
PROCESSES = 2


class SlowParts(SyntheticParts):
    def load_image(self, index: int):
        time.sleep(LOAD_SECONDS)
        return super().load_image(index)


def main(root: str, start: str, name: str) -> None:
    torch.set_num_threads(1)
    backbone = create_backbone(BackboneConfig(name="timm/test_convnext", weights="none", image_size=64))
    info = backbone.info
    transform = ViewTransform(64, 1.0, info.mean, info.std, seed=0)
    dataset = SlowParts("train", num_classes=3, images_per_class=6, image_size=64, seed=0)
    (Path(start) / name).touch()
    while len(list(Path(start).iterdir())) < PROCESSES:
        time.sleep(0.01)
    config = CacheConfig(root=root, shard_size=4, batch_size=2, num_workers=0)
    store = build_cache(dataset, backbone, transform, views=1, config=config)
    assert store is not None and store.manifest["complete"]


if __name__ == "__main__":
    main(*sys.argv[1:])
