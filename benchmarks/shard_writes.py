"""Writing cache shards as fast as a GPU makes them: now (row blocks written and hashed as they
come, `WRITER_THREADS` writer threads, the finite check made where the maps were computed)
against before (blocks joined by the main process, one writer thread that checked the values,
saved the array and read the file back to hash it), side by side.

The maps are ResNet-50's shape at 224 px (7 x 7 x 2048 float16, 196 kB each) in batches of
`--batch`, `--shard` maps per shard. Both ways write the same `--shards` shards into a fresh
folder; the time runs from the first batch handed over to the last shard on disk, and "caller
blocked" is how long handing a shard over held up the caller, the main process that drives the
backbone (joining the blocks, before, and waiting for a free slot, both). Prints maps/s, GB/s and
the ratio; median of `--rounds` alternating rounds.

    python benchmarks/shard_writes.py [--shards 8] [--shard 512] [--batch 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import machine

from protoquant.atomic import sha256_file, write_file_atomic
from protoquant.cache.files import shard_paths
from protoquant.cache.shards import WRITER_THREADS, ShardWriter

SHAPE = (7, 7, 2048)  # ResNet-50's last stage at 224 px


def former_write(folder: Path, shard: int, features: np.ndarray, pooled: np.ndarray) -> None:
    """The former shard write: a finite check, np.save of the joined array, then a read-back hash."""
    assert np.isfinite(features.reshape(len(features), -1)).all() and np.isfinite(pooled).all()
    for path, array in zip(shard_paths(folder, shard), (features, pooled)):
        write_file_atomic(path, lambda tmp, a=array: np.save(tmp, a), suffix=".npy", durable=False)
        sha256_file(path)


def run_now(folder: Path, batches: list, args: argparse.Namespace) -> tuple[float, float]:
    writer, handing = ShardWriter(), 0.0
    start = time.perf_counter()
    for shard in range(args.shards):
        audit = {
            "shard": shard,
            "first": shard * args.shard,
            "count": args.shard,
            "split": "bench",
            "rank": 0,
        }
        begin = time.perf_counter()
        features, pooled = [f for f, _ in batches], [p for _, p in batches]
        finite = [np.ones(len(f), dtype=bool) for f in features]  # caching checks on the device
        writer.submit(folder, shard, features, pooled, audit, finite)
        handing += time.perf_counter() - begin
    writer.close()
    return time.perf_counter() - start, handing


def run_before(folder: Path, batches: list, args: argparse.Namespace) -> tuple[float, float]:
    pool, pending, handing = ThreadPoolExecutor(max_workers=1), [], 0.0
    start = time.perf_counter()
    for shard in range(args.shards):
        begin = time.perf_counter()
        features = np.concatenate([f for f, _ in batches])
        pooled = np.concatenate([p for _, p in batches])
        while len(pending) >= 2:  # the former ShardWriter's max_pending
            pending.pop(0).result()
        pending.append(pool.submit(former_write, folder, shard, features, pooled))
        handing += time.perf_counter() - begin
    for future in pending:
        future.result()
    pool.shutdown()
    return time.perf_counter() - start, handing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard", type=int, default=512, help="maps per shard (cache.shard_size)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    batches = [  # one shard's batches, written again for every shard
        (
            rng.standard_normal((args.batch, *SHAPE)).astype(np.float16),
            rng.standard_normal((args.batch, SHAPE[-1])).astype(np.float32),
        )
        for _ in range(args.shard // args.batch)
    ]
    maps = args.shards * args.shard
    gigabytes = maps * (np.prod(SHAPE) * 2 + SHAPE[-1] * 4) / 1e9
    ways = {f"now ({WRITER_THREADS} threads, blocks)": run_now, "before (1 thread, joined)": run_before}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(way(Path(tmp), batches, args))
    print(f"machine: {machine()}")
    print(
        f"{args.shards} shards of {args.shard} maps 7 x 7 x 2048 float16 ({gigabytes:.2f} GB), batch {args.batch}, median of {args.rounds}"
    )
    print("| way | maps/s | GB/s | caller blocked per shard (ms) |")
    print("|---|---|---|---|")
    medians = {}
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        handing = statistics.median(r[1] for r in runs) / args.shards
        medians[name] = seconds
        print(f"| {name} | {maps / seconds:.0f} | {gigabytes / seconds:.2f} | {handing * 1e3:.1f} |")
    now, before = medians.values()
    print(f"before / now: {before / now:.2f}x")


if __name__ == "__main__":
    main()
