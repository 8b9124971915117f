"""Stage 2's training scores on disk (above head.scores_memory_mb) train the same head as in memory.

Run as a script under torchrun (`python -m torch.distributed.run ... test_scores_file.py CACHE OUT`)
it trains on 2 gloo processes both ways and writes whether they agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from protoquant import distributed
from protoquant.atomic import host_token
from protoquant.cache.store import FeatureStore
from protoquant.cache.synthetic import write_cache
from protoquant.cache.view import CacheView
from protoquant.config import HeadConfig
from protoquant.errors import CacheError
from protoquant.train import head as stage2
from protoquant.train.baseline import train_baseline_head
from protoquant.train.prune import class_mean_scores
from protoquant.train.score_tables import IOV_MAX, ScoresOnDisk, run_starts
from protoquant.train.scores import ScoresSource

CPU = torch.device("cpu")
ENTRIES, VAL, CLASSES, GRID, CHANNELS, PROTOTYPES = 1300, 200, 4, (3, 3), 256, 256  # tables of 1.07 MiB
FILE, MEMORY = 1, 1_000_000  # head.scores_memory_mb: below one table, above every table
HEAD = HeadConfig(
    epochs=3,
    batch_size=64,
    temperature_grid=(0.1, 0.5),
    lr_grid=(0.01, 0.1),
    top_k_per_class=4,
    top_k_fallback=(),
    top_k_epochs=3,
)


def make_cache(folder: Path) -> FeatureStore:
    """ENTRIES maps whose mean direction depends on the class, plus noise (seeded)."""
    generator = np.random.default_rng(0)
    labels = generator.integers(0, CLASSES, ENTRIES)
    centres = generator.normal(size=(CLASSES, CHANNELS))
    noise = generator.normal(size=(ENTRIES, *GRID, CHANNELS))
    maps = (centres[labels][:, None, None, :] + 2.0 * noise).astype(np.float16)  # (N, H, W, D)
    return write_cache(
        folder, labels, lambda first, count: maps[first : first + count], grid=GRID, channels=CHANNELS,
        shard_size=256,
    )  # fmt: skip


def make_codebook() -> torch.Tensor:
    return torch.randn(PROTOTYPES, CHANNELS, generator=torch.Generator().manual_seed(1))  # (K, D)


def splits(store: FeatureStore) -> tuple[CacheView, CacheView]:
    entries = store.entries()
    return CacheView(store, entries[:-VAL]), CacheView(store, entries[-VAL:])


def train(store: FeatureStore, memory_mb: int, ctx=None, **config) -> tuple[stage2.ProtoQuantHead, dict]:
    head_config = replace(HEAD, scores_memory_mb=memory_mb, **config)
    usage = torch.ones(PROTOTYPES)
    codebook, (train_view, val_view) = make_codebook(), splits(store)
    return stage2.train_head(
        codebook, usage, train_view, val_view, CLASSES, head_config, seed=0, device=CPU, ctx=ctx
    )


def scratch_entries(store: FeatureStore | Path) -> list[str]:
    folder = store if isinstance(store, Path) else store.folder
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".scores"))


def assert_same_head(first, second) -> None:
    (head_a, selection_a), (head_b, selection_b) = first, second
    assert torch.equal(head_a.class_layer.weight, head_b.class_layer.weight)
    assert torch.equal(head_a.class_layer.mask, head_b.class_layer.mask)
    assert selection_a == selection_b


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return make_cache(tmp_path_factory.mktemp("scores") / "train")


@pytest.fixture
def seen(monkeypatch) -> list:
    """(table type, scratch entries of the cache folder) at every class-layer fit."""
    calls, fit = [], stage2.fit_class_layer

    def spy(layer, train_rows, *args, **kwargs):
        on_disk = isinstance(train_rows, ScoresOnDisk)
        entries = scratch_entries(train_rows.paths[0].parents[1]) if on_disk else []
        calls.append((type(train_rows).__name__, entries))
        return fit(layer, train_rows, *args, **kwargs)

    monkeypatch.setattr(stage2, "fit_class_layer", spy)
    return calls


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_scores_on_disk_train_the_same_head_bit_for_bit(store, seen, dtype) -> None:
    in_memory = train(store, MEMORY, scores_dtype=dtype)
    assert {name for name, _ in seen} == {"ScoresInMemory"} and scratch_entries(store) == []
    seen.clear()
    on_disk = train(store, FILE, scores_dtype=dtype)
    assert {name for name, _ in seen} == {"ScoresOnDisk"}  # every fit, the top-k fine-tuning too
    assert all(len(entries) == 1 and entries[0].startswith(".scores.tmp-") for _, entries in seen)
    assert_same_head(in_memory, on_disk)
    assert in_memory[1]["top_k"] == 4 and scratch_entries(store) == []  # removed after stage 2


def test_dense_head_on_disk_equals_memory(store) -> None:
    assert_same_head(train(store, MEMORY, top_k_per_class=0), train(store, FILE, top_k_per_class=0))


def test_baseline_head_on_disk_equals_memory(store) -> None:
    train_view, val_view = splits(store)
    config = replace(HEAD, top_k_per_class=4, lr_grid=(0.05,))
    runs = [
        train_baseline_head(
            train_view, val_view, CLASSES, replace(config, scores_memory_mb=mb), seed=0, device=CPU
        )
        for mb in (MEMORY, FILE)
    ]
    assert torch.equal(runs[0][0].class_layer.weight, runs[1][0].class_layer.weight)
    assert runs[0][1] == runs[1][1] and scratch_entries(store) == []


def test_scratch_is_removed_when_stage_2_fails(store, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("fit failed")

    monkeypatch.setattr(stage2, "fit_class_layer", fail)
    with pytest.raises(RuntimeError, match="fit failed"):
        train(store, FILE)
    assert scratch_entries(store) == []


def test_a_killed_runs_scratch_is_removed_by_the_next(store) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is no longer alive
    leftover = store.folder / f".scores.tmp-{child.pid}-{host_token()}"
    leftover.mkdir()
    (leftover / "table-0.rank-0").write_bytes(b"\0" * 64)
    train(store, FILE, temperature_grid=(), lr_grid=(), top_k_per_class=0)
    assert scratch_entries(store) == []


def test_memory_or_disk_is_decided_by_the_size_of_the_live_tables(store) -> None:
    train_view, _ = splits(store)
    table_mb = (ENTRIES - VAL) * PROTOTYPES * 4 / 2**20  # 1.07 MiB in float32
    cases = [(1, 1, "float32", False), (2, 1, "float32", True), (2, 2, "float32", False)]
    cases += [(3, 2, "float32", True), (1, 1, "float16", True), (1, 2, "float16", False)]
    for memory_mb, tables, dtype, in_memory in cases:
        config = replace(HEAD, scores_memory_mb=memory_mb, scores_dtype=dtype)
        source = ScoresSource(train_view, config, distributed.Context(), prototypes=PROTOTYPES, tables=tables)
        assert source.in_memory == in_memory, (memory_mb, tables, dtype)
        assert source.table_mb == pytest.approx(table_mb * (0.5 if dtype == "float16" else 1.0))


def write_parts(folder: Path, scores: torch.Tensor, world: int) -> list[Path]:
    """The strided files that `world` ranks write: rank r holds rows r, r + world, ..."""
    paths = [folder / f"table-0.rank-{rank}" for rank in range(world)]
    for rank, path in enumerate(paths):
        path.write_bytes(scores[rank::world].contiguous().numpy().tobytes())
    return paths


@pytest.mark.parametrize("world", [1, 3])
def test_scores_on_disk_read_any_rows_of_strided_files(tmp_path, world) -> None:
    generator = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(50, 7, generator=generator), torch.randint(0, 4, (50,), generator=generator)
    table = ScoresOnDisk(write_parts(tmp_path, scores, world), labels, 7, torch.float32)
    rows = np.concatenate([np.random.default_rng(0).permutation(50), [3, 3, 4, 5, 6, 49]])
    batch, batch_labels = table.batch(rows)
    assert torch.equal(batch, scores[rows]) and torch.equal(batch_labels, labels[rows])
    assert torch.equal(torch.from_numpy(table.rows(np.arange(10, 30))), scores[10:30])
    torch.testing.assert_close(
        table.class_means(5), class_mean_scores(scores, labels, 5), rtol=1e-6, atol=1e-7
    )
    assert torch.equal(table.class_means(5)[4], torch.zeros(7))  # a class without rows
    table.close()


def test_runs_of_adjacent_rows_begin_where_a_gap_is_and_every_iov_max_rows() -> None:
    local = np.array([0, 1, 2, 5, 6, 9, *range(20, 20 + 2 * IOV_MAX + 3), 5000])
    expected, length = [], 0
    for index, value in enumerate(local.tolist()):  # one item at a time, as a reader would cut them
        length = length + 1 if index and value == local[index - 1] + 1 and length < IOV_MAX else 1
        if length == 1:
            expected.append(index)
    assert run_starts(local).tolist() == expected
    assert expected == [0, 3, 5, 6, 6 + IOV_MAX, 6 + 2 * IOV_MAX, 9 + 2 * IOV_MAX]


def test_a_run_longer_than_one_preadv_reads_back_whole(tmp_path) -> None:
    rows = 3 * IOV_MAX + 5
    scores, labels = torch.rand(rows, 2), torch.zeros(rows, dtype=torch.long)
    table = ScoresOnDisk(write_parts(tmp_path, scores, 1), labels, 2, torch.float32)
    order = np.arange(rows)[::-1].copy()  # one run in file order, given backwards
    assert torch.equal(table.batch(order)[0], scores[torch.from_numpy(order)])
    table.close()


def test_a_truncated_scores_file_names_the_file(tmp_path) -> None:
    scores, labels = torch.rand(10, 4), torch.zeros(10, dtype=torch.long)
    paths = write_parts(tmp_path, scores, 2)
    paths[1].write_bytes(paths[1].read_bytes()[:-3])
    with pytest.raises(CacheError, match=f"{paths[1]}: 77 bytes of training scores, expected 80"):
        ScoresOnDisk(paths, labels, 4, torch.float32)


def test_two_processes_train_the_same_head_on_disk_as_in_memory(store, tmp_path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, __file__, str(store.folder), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["same"] and scratch_entries(store) == []


def two_process_job(folder: str, out: str) -> None:
    """Train both ways on this process group; rank 0 writes whether every rank agreed."""
    ctx = distributed.init(CPU)
    store = FeatureStore(folder)
    in_memory, on_disk = train(store, MEMORY, ctx), train(store, FILE, ctx)
    same = torch.equal(in_memory[0].class_layer.weight, on_disk[0].class_layer.weight)
    same = same and torch.equal(in_memory[0].class_layer.mask, on_disk[0].class_layer.mask)
    same = same and in_memory[1] == on_disk[1]
    agreed = distributed.all_reduce_sum(torch.tensor([float(same)]))
    if ctx.is_main:
        Path(out).write_text(json.dumps({"world": ctx.world_size, "same": bool(agreed[0] == ctx.world_size)}))
    distributed.cleanup()


if __name__ == "__main__":
    two_process_job(sys.argv[1], sys.argv[2])
