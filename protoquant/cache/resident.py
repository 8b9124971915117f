"""Where the training loops read the cached maps from: device memory, or streamed from the shards.

A batch source gives the training loops, for any entries of its cache view, the features
(B, D, H, W) float32 and labels (B,) int64 on the run's device. Two kinds, one interface:

- `ResidentSource`: the view's maps loaded once into one float16 tensor on the device (shard
  by shard, so host memory holds one shard at a time); a batch is an `index_select` there,
  cast to float32 on the device. On the CPU this means "loaded into RAM".
- `StreamedSource`: each batch gathered from the memory-mapped shards. On CUDA the next batch
  is gathered into pinned host memory and copied on a side stream while the current batch
  computes; elsewhere it is `FeatureStore.get`, batch by batch.

`choose` picks one from `cache.resident` ("auto" | "device" | "stream") and the free device memory.
Both kinds give bit-identical batches: the stored float16 values cast to float32.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch

from protoquant import progress
from protoquant.cache.store import FeatureStore
from protoquant.cache.view import CacheView
from protoquant.errors import CacheError, ConfigError

logger = logging.getLogger(__name__)

MODES = ("auto", "device", "stream")
Placement = Literal["device", "stream"]
Batch = tuple[torch.Tensor, torch.Tensor]  # features (B, D, H, W) float32, labels (B,) int64
GIB = 2**30


class BatchSource(abc.ABC):
    """Features and labels of the entries of `view`, on `device`.

    Args:
        view: the cache view; only its entries can be asked for (any order, repeats allowed).
        device: where the batches are delivered.
    """

    placement: Placement

    def __init__(self, view: CacheView, device: torch.device | str) -> None:
        self.view, self.device = view, torch.device(device)
        self._position = np.full(len(view.store), -1, dtype=np.int64)  # entry id -> index in the view
        self._position[view.entries] = np.arange(len(view.entries))

    @abc.abstractmethod
    def get(self, entries: np.ndarray) -> Batch:
        """(features (B, D, H, W) float32, labels (B,) int64) of `entries`, on the device."""

    def iterate(self, chunks: Iterable[np.ndarray]) -> Iterator[Batch]:
        """One batch per array of entry ids in `chunks` (e.g. an epoch's shuffled batches)."""
        for chunk in chunks:
            yield self.get(chunk)

    def batches(self, entries: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """Consecutive batches of `batch_size` entries (the last may be shorter), in the given order."""
        entries = np.asarray(entries, dtype=np.int64)
        return self.iterate(
            entries[start : start + batch_size] for start in range(0, len(entries), batch_size)
        )

    def positions(self, entries: np.ndarray) -> np.ndarray:
        """(B,) index of each entry id within the view. Raises IndexError for one outside it."""
        entries = np.asarray(entries, dtype=np.int64).reshape(-1)
        outside = (entries < 0) | (entries >= len(self._position))
        positions = np.where(outside, -1, self._position[np.clip(entries, 0, len(self._position) - 1)])
        if (positions < 0).any():
            bad = entries[positions < 0][0]
            raise IndexError(f"{self.view.store.folder}: entry {bad} is not in this cache view")
        return positions

    def within(self, entries: np.ndarray) -> np.ndarray:
        """`entries` as int64 ids, checked to be in the view (IndexError otherwise)."""
        entries = np.asarray(entries, dtype=np.int64).reshape(-1)
        self.positions(entries)
        return entries


class ResidentSource(BatchSource):
    """The view's maps held in one float16 tensor `maps` (N, H, W, D) on the device."""

    placement: Placement = "device"

    def __init__(self, view: CacheView, device: torch.device | str) -> None:
        super().__init__(view, device)
        self.maps = load_maps(view, self.device)  # (N, H, W, D) float16, the view's order
        self.labels = view.labels.to(self.device)  # (N,)

    def get(self, entries: np.ndarray) -> Batch:
        index = torch.from_numpy(self.positions(entries))
        if self.device.type == "cuda":  # a pageable copy would wait for all queued work first
            index = index.pin_memory().to(self.device, non_blocking=True)
        index = index.to(self.device)
        features = self.maps.index_select(0, index).float().permute(0, 3, 1, 2)  # (B, D, H, W)
        return features, self.labels.index_select(0, index)


def load_maps(view: CacheView, device: torch.device) -> torch.Tensor:
    """(N, H, W, D) float16 maps of the view's entries, in its order, filled one shard at a time."""
    store = view.store
    height, width = store.grid
    shape = (height, width, store.channels)
    maps = torch.empty((len(view.entries), *shape), dtype=torch.float16, device=device)
    shard_of = view.entries // store.shard_size
    order = np.argsort(shard_of, kind="stable")  # view positions grouped by shard
    shards, starts = np.unique(shard_of[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    pinned = device.type == "cuda"
    buffer = torch.empty((store.shard_size, *shape), dtype=torch.float16, pin_memory=pinned)
    for start, stop in progress.bar(list(zip(starts, bounds)), desc="loading cached maps", unit="shard"):
        positions = order[start:stop]
        part = buffer[: len(positions)]
        store.gather(view.entries[positions], part.numpy())
        maps.index_copy_(0, torch.from_numpy(positions).to(device), part.to(device))
    logger.debug("loaded %d maps from %d shards of %s", len(view.entries), len(shards), store.folder)
    return maps


class StreamedSource(BatchSource):
    """Each batch read from the memory-mapped shards; prefetched on a side stream on CUDA."""

    placement: Placement = "stream"

    def get(self, entries: np.ndarray) -> Batch:
        entries = self.within(entries)
        labels = torch.from_numpy(self.view.store.labels[entries])
        return self.view.store.get(entries).to(self.device), labels.to(self.device)

    def iterate(self, chunks: Iterable[np.ndarray]) -> Iterator[Batch]:
        if self.device.type != "cuda":
            return super().iterate(chunks)
        return _Prefetcher(self.view.store, self.device).run(self.within(chunk) for chunk in chunks)


class _Prefetcher:
    """Batch i+1 is gathered into pinned host memory and copied on a side stream while batch i computes.

    Two pinned buffers alternate; a buffer is written again only after the copy that read it
    has finished (its event). The consumer's stream waits for a batch's own copy event (not
    for the whole side stream, which is already copying the next batch), and the batch's
    tensors are recorded on the consumer's stream so their memory is not reused too early.
    """

    def __init__(self, store: FeatureStore, device: torch.device) -> None:
        self.store, self.device = store, device
        self.stream = torch.cuda.Stream(device)
        self.buffers: list[torch.Tensor | None] = [None, None]  # pinned (n, H, W, D) float16
        self.copied: list[torch.cuda.Event | None] = [None, None]  # the buffer's last copy is done

    def run(self, chunks: Iterable[np.ndarray]) -> Iterator[Batch]:
        staged = None
        for step, entries in enumerate(chunks):
            ahead = self._stage(entries, step % 2)
            if staged is not None:
                yield self._hand_over(*staged)
            staged = ahead
        if staged is not None:
            yield self._hand_over(*staged)

    def _buffer(self, slot: int, count: int) -> torch.Tensor:
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy that last read this buffer has finished
        buffer = self.buffers[slot]
        if buffer is None or len(buffer) < count:
            shape = (count, *self.store.grid, self.store.channels)
            buffer = self.buffers[slot] = torch.empty(shape, dtype=torch.float16, pin_memory=True)
        return buffer[:count]

    def _stage(self, entries: np.ndarray, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]:
        host = self._buffer(slot, len(entries))  # (B, H, W, D)
        self.store.gather(entries, host.numpy())
        labels = torch.from_numpy(self.store.labels[entries]).pin_memory()
        with torch.cuda.stream(self.stream):
            maps = host.to(self.device, non_blocking=True)
            features = maps.float().permute(0, 3, 1, 2)  # (B, D, H, W)
            labels = labels.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.copied[slot] = done
        return features, labels, done

    def _hand_over(self, features: torch.Tensor, labels: torch.Tensor, done: torch.cuda.Event) -> Batch:
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(done)
        features.record_stream(consumer)
        labels.record_stream(consumer)
        return features, labels


def decide(
    mode: str, maps_nbytes: int, free_nbytes: int | None, margin: float, device_type: str
) -> Placement:
    """'device' or 'stream' for `cache.resident` = `mode` (a pure function of the sizes).

    free_nbytes is the free memory of a CUDA device (None elsewhere). "auto" loads into CUDA
    memory when maps_nbytes <= (1 - margin) * free_nbytes, and streams otherwise (and on
    every other device). "device" on CUDA needs maps_nbytes <= free_nbytes; elsewhere it loads
    into the device's memory unchecked (on the CPU: RAM).

    Raises:
        ConfigError: an unknown mode, or a margin outside [0, 1).
        CacheError: "device" on CUDA, and the maps do not fit in free memory.
    """
    if mode not in MODES:
        raise ConfigError(f"config field 'cache.resident' must be one of {', '.join(MODES)}; got '{mode}'")
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"config field 'cache.resident_margin' must be in [0, 1); got {margin}")
    on_cuda = device_type == "cuda" and free_nbytes is not None
    if mode == "stream":
        return "stream"
    if mode == "device":
        if on_cuda and maps_nbytes > free_nbytes:
            raise CacheError(
                f"cache.resident = 'device': the cached maps take {maps_nbytes / GIB:.2f} GiB but the "
                f"GPU has {free_nbytes / GIB:.2f} GiB free; use cache.resident = 'stream' or 'auto'"
            )
        return "device"
    return "device" if on_cuda and maps_nbytes <= (1.0 - margin) * free_nbytes else "stream"


def free_cuda_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on a CUDA device: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (which the driver counts as taken)."""
    idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(torch.cuda.mem_get_info(device)[0]) + max(int(idle), 0)


def placement_for(view: CacheView, mode: str, margin: float, device: torch.device) -> Placement:
    """`decide` for this view on `device`, with the CUDA device's free memory; logs the decision."""
    free = free_cuda_bytes(device) if device.type == "cuda" else None
    chosen = decide(mode, view.maps_nbytes, free, margin, device.type)
    free_text = f"{free / GIB:.2f} GiB free on {device}" if free is not None else f"device {device}"
    logger.info(
        "cache.resident = '%s': %s for %d maps of %s (%.2f GiB; %s, margin %.2f)",
        mode,
        "loaded into device memory" if chosen == "device" else "streamed from the shards",
        len(view.entries),
        view.store.folder,
        view.maps_nbytes / GIB,
        free_text,
        margin,
    )
    return chosen


def choose(view: CacheView, mode: str, margin: float, device: torch.device | str) -> BatchSource:
    """The batch source `cache.resident` = `mode` asks for (see `decide`)."""
    device = torch.device(device)
    if placement_for(view, mode, margin, device) == "device":
        return ResidentSource(view, device)
    return StreamedSource(view, device)


def as_source(subset: CacheView | BatchSource, device: torch.device | str) -> BatchSource:
    """`subset` itself when it is a batch source, else a streamed source over the view.

    For one pass over a view a stream reads each map once, as loading it would.
    """
    return subset if isinstance(subset, BatchSource) else StreamedSource(subset, device)
