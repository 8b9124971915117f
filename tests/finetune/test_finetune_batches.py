"""The global batches of fine-tuning are the same images on any number of processes."""

from __future__ import annotations

import numpy as np
import pytest

from protoquant.distributed import Context
from protoquant.finetuning.loop import GlobalBatches


def _epoch(size: int, batch: int, world: int, epoch: int) -> list[list[int]]:
    """Global batch b of the epoch as the union of every rank's share of it (sorted)."""
    shares = []
    for rank in range(world):
        sampler = GlobalBatches(size, batch, seed=3, ctx=Context(rank=rank, world_size=world))
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler) == size // batch
        assert all(len(part) == batch // world for part in shares[-1])
    return [sorted(sum((s[b] for s in shares), [])) for b in range(size // batch)]


@pytest.mark.parametrize("world", [2, 4])
def test_every_process_count_trains_on_the_same_global_batches(world) -> None:
    for epoch in (0, 1):
        assert _epoch(50, 8, world, epoch) == _epoch(50, 8, 1, epoch)


def test_an_epoch_sees_each_image_at_most_once_and_epochs_differ() -> None:
    first, second = _epoch(50, 8, 2, 0), _epoch(50, 8, 2, 1)
    seen = np.concatenate(first)
    assert len(seen) == 48 and len(np.unique(seen)) == 48  # the incomplete last batch is dropped
    assert first != second
