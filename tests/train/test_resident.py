"""Batch sources over a cache view: device-resident and streamed give the same batches and training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from protoquant.cache import resident
from protoquant.cache.resident import ResidentSource, StreamedSource, choose, decide, placement_for
from protoquant.cache.synthetic import write_cache
from protoquant.cache.view import CacheView
from protoquant.config import CacheConfig, CodebookConfig
from protoquant.errors import CacheError, ConfigError
from protoquant.train.codebook import evaluate_quantized, init_codebook, prototype_usage, train_codebook
from protoquant.train.probe import new_probe

CPU = torch.device("cpu")
DEVICES = [CPU, *([torch.device("cuda")] if torch.cuda.is_available() else [])]  # gpu.sh runs the CUDA cases
GRID, CHANNELS, CLASSES, ENTRIES, SHARD = (3, 3), 8, 3, 30, 7  # 5 shards, the last one partial
GIB = 2**30


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    labels = np.arange(ENTRIES) % CLASSES
    centres = rng.normal(size=(CLASSES, CHANNELS))  # class-dependent maps, so stage 1 learns something
    maps = centres[labels][:, None, None, :] + rng.normal(size=(ENTRIES, *GRID, CHANNELS))  # (N, H, W, D)

    def shard_maps(first: int, count: int) -> np.ndarray:
        return maps[first : first + count]

    folder = tmp_path_factory.mktemp("resident_cache")
    return write_cache(folder, labels, shard_maps, grid=GRID, channels=CHANNELS, shard_size=SHARD)


@pytest.fixture(scope="module")
def views(store):
    order = np.random.default_rng(1).permutation(ENTRIES)
    return CacheView(store, np.sort(order[:20])), CacheView(store, order[20:])  # val: not in file order


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_both_sources_give_the_stored_maps_as_float32(views, device) -> None:
    view = views[1]
    asked = np.random.default_rng(2).choice(view.entries, size=12)  # any order, with repeats
    expected = view.store.get(asked)
    for source in (ResidentSource(view, device), StreamedSource(view, device)):
        features, labels = source.get(asked)
        assert features.device.type == device.type and features.dtype == torch.float32
        assert features.shape == (12, CHANNELS, *GRID) and features.stride() == expected.stride()
        assert torch.equal(features.cpu(), expected)
        assert torch.equal(labels.cpu(), torch.from_numpy(view.store.labels[asked]))


def test_resident_maps_are_the_views_entries_in_its_order(views) -> None:
    view = views[1]
    source = ResidentSource(view, CPU)
    assert source.maps.dtype == torch.float16 and source.maps.shape == (len(view.entries), *GRID, CHANNELS)
    assert torch.equal(source.maps.float().permute(0, 3, 1, 2), view.store.get(view.entries))
    assert torch.equal(source.labels, view.labels)


def test_resident_loading_holds_one_shard_at_a_time(views, monkeypatch) -> None:
    view, store = views[0], views[0].store
    reads: list[np.ndarray] = []
    gather = store.gather

    def recording_gather(entries, out):
        reads.append(np.asarray(entries))
        gather(entries, out)

    monkeypatch.setattr(store, "gather", recording_gather)
    ResidentSource(view, CPU)
    assert all(len(np.unique(part // SHARD)) == 1 and len(part) <= SHARD for part in reads)
    assert sorted(np.concatenate(reads).tolist()) == sorted(view.entries.tolist())


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_batches_cover_the_entries_in_order(views, device) -> None:
    view = views[0]
    for source in (ResidentSource(view, device), StreamedSource(view, device)):
        labels = torch.cat([labels.cpu() for _, labels in source.batches(view.entries, 6)])
        sizes = [len(labels) for _, labels in source.batches(view.entries, 6)]
        assert sizes == [6, 6, 6, 2] and torch.equal(labels, view.labels)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_every_batch_is_the_stored_maps_while_the_next_is_staged(views, device) -> None:
    """On CUDA the streamed batches come through the side-stream prefetcher, two pinned buffers
    alternating: each batch is still whole when the consumer's kernels read it after the next
    one was staged (a missing wait or a buffer reused too early shows as a wrong batch)."""
    view = views[0]
    order = np.random.default_rng(4).permutation(view.entries)
    chunks = [order[i : i + 3] for i in range(0, len(order), 3)]
    for source in (StreamedSource(view, device), ResidentSource(view, device)):
        got = [(features * 1.0, labels) for features, labels in source.iterate(iter(chunks))]
        for chunk, (features, labels) in zip(chunks, got, strict=True):
            assert torch.equal(features.cpu(), view.store.get(chunk))
            assert torch.equal(labels.cpu(), torch.from_numpy(view.store.labels[chunk]))


def test_entries_outside_the_view_are_refused(views) -> None:
    view, other = views
    for source in (ResidentSource(view, CPU), StreamedSource(view, CPU)):
        with pytest.raises(IndexError, match=f"entry {other.entries[0]} is not in this cache view"):
            source.get(np.array([view.entries[0], other.entries[0]]))
        with pytest.raises(IndexError, match="entry 30 is not"):
            source.get(np.array([ENTRIES]))


def test_gather_checks_the_output_array(store) -> None:
    with pytest.raises(ValueError, match="gather needs a float16"):
        store.gather(np.arange(2), np.empty((2, *GRID, CHANNELS), dtype=np.float32))


@pytest.mark.parametrize(
    ("mode", "maps", "free", "device_type", "expected"),
    [
        ("stream", 1, 100 * GIB, "cuda", "stream"),
        ("auto", 8 * GIB, 10 * GIB, "cuda", "device"),  # 8 <= 0.8 * 10
        ("auto", 9 * GIB, 10 * GIB, "cuda", "stream"),  # fits, but not with the margin to spare
        ("auto", 1, None, "cpu", "stream"),  # auto loads only into CUDA memory
        ("device", 9 * GIB, 10 * GIB, "cuda", "device"),  # an explicit request ignores the margin
        ("device", 10**15, None, "cpu", "device"),  # RAM: not checked
    ],
)
def test_decide(mode, maps, free, device_type, expected) -> None:
    assert decide(mode, maps, free, 0.2, device_type) == expected


def test_decide_refuses_what_cannot_work() -> None:
    with pytest.raises(CacheError, match=r"take 12\.00 GiB but the GPU has 10\.00 GiB free"):
        decide("device", 12 * GIB, 10 * GIB, 0.2, "cuda")
    with pytest.raises(ConfigError, match="'cache.resident' must be one of auto, device, stream; got 'gpu'"):
        decide("gpu", 1, None, 0.2, "cpu")
    with pytest.raises(ConfigError, match="'cache.resident_margin'"):
        decide("auto", 1, 10, 1.0, "cuda")


def test_placement_reads_free_cuda_memory_and_logs_the_sizes(views, monkeypatch, caplog) -> None:
    view = views[0]
    asked = []

    def mem_get_info(device=None):
        asked.append(device)
        return free, 100 * view.maps_nbytes

    monkeypatch.setattr(resident.torch.cuda, "mem_get_info", mem_get_info)
    cuda = torch.device("cuda", 1)
    free = view.maps_nbytes * 2
    with caplog.at_level(logging.INFO, logger="protoquant.cache.resident"):
        assert placement_for(view, "auto", 0.2, cuda) == "device"
    assert asked == [cuda] and "loaded into device memory for 20 maps" in caplog.text
    assert f"{view.maps_nbytes / GIB:.2f} GiB; {free / GIB:.2f} GiB free on cuda:1" in caplog.text
    free = view.maps_nbytes
    assert placement_for(view, "auto", 0.2, cuda) == "stream"
    assert placement_for(view, "device", 0.2, cuda) == "device"
    free = view.maps_nbytes - 1
    with pytest.raises(CacheError):
        placement_for(view, "device", 0.2, cuda)
    # Blocks the caching allocator reserved and no tensor uses count as free for this process.
    monkeypatch.setattr(resident.torch.cuda, "memory_reserved", lambda device=None: 5 * view.maps_nbytes)
    monkeypatch.setattr(resident.torch.cuda, "memory_allocated", lambda device=None: 4 * view.maps_nbytes)
    assert placement_for(view, "auto", 0.2, cuda) == "device"  # (1 - 0.2) * (N - 1 + N) >= N


def test_choose_on_the_cpu(views) -> None:
    view = views[0]
    assert view.maps_nbytes == len(view.entries) * GRID[0] * GRID[1] * CHANNELS * 2
    assert isinstance(choose(view, "device", 0.2, "cpu"), ResidentSource)
    assert isinstance(choose(view, "auto", 0.2, "cpu"), StreamedSource)
    assert isinstance(choose(view, "stream", 0.2, "cpu"), StreamedSource)


def test_stage1_is_bit_identical_resident_or_streamed(views) -> None:
    train, val = views
    probe = new_probe(CHANNELS, CLASSES, seed=0).requires_grad_(False)
    config = CodebookConfig(
        num_prototypes=6, kmeans_patches=90, kmeans_iters=3, epochs=3, batch_size=4, cutmix_prob=0.5
    )
    runs = {}
    for mode in ("device", "stream"):
        cache = CacheConfig(resident=mode)
        runs[mode] = train_codebook(train, val, probe, config, seed=3, device=CPU, cache=cache)
    (device_codes, device_history), (stream_codes, stream_history) = runs["device"], runs["stream"]
    assert torch.equal(device_codes.codebook, stream_codes.codebook)
    assert torch.equal(device_codes.usage, stream_codes.usage) and device_codes.usage.sum() > 0
    assert device_history == stream_history and len(device_history) == 3
    assert not torch.equal(device_codes.codebook, init_codebook(train, config, seed=3))  # it trained
    source = ResidentSource(val, CPU)
    accuracy = evaluate_quantized(device_codes, probe, val, 4, CPU)
    assert evaluate_quantized(device_codes, probe, source, 4, CPU) == accuracy
    counts = prototype_usage(device_codes.codebook, val, 3, CPU)
    assert torch.equal(prototype_usage(device_codes.codebook, source, 3, CPU), counts)
    assert counts.sum() == len(val.entries) * GRID[0] * GRID[1]


def test_the_prefetcher_stages_one_batch_ahead_and_keeps_the_order() -> None:
    events: list[tuple[str, int]] = []
    slots: list[int] = []  # the pinned buffer each batch is gathered into

    class Recording(resident._Prefetcher):
        def __init__(self) -> None:  # no CUDA stream: only the order of staging and hand-over is checked
            pass

        def _stage(self, entries, slot):
            events.append(("stage", int(entries[0])))
            slots.append(slot)
            return (int(entries[0]),)

        def _hand_over(self, first):
            events.append(("hand over", first))
            return first

    chunks = [np.array([i]) for i in range(4)]
    assert list(Recording().run(iter(chunks))) == [0, 1, 2, 3]
    staged_before = [events.index(("stage", i + 1)) < events.index(("hand over", i)) for i in range(3)]
    assert all(staged_before) and events[-1] == ("hand over", 3)
    assert slots == [0, 1, 0, 1]  # two buffers alternate: batch i+1 never overwrites batch i
    assert list(Recording().run(iter([]))) == []
