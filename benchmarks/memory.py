"""Peak memory of the k-means initialisation: full-map gather (old) against cell reads (new).

For each cache size, writes a complete cache of random float16 maps (the library's own shard
writer, shards of 512) into a temporary folder, deleted afterwards, and runs `init_codebook`
(kmeans_patches patches, K prototypes) in a fresh process per method, one thread, the cache's
pages evicted first. "old" is the former `sample_patches`: it loads the full float32 map of every
entry that gives at least one sampled patch, then picks the patches. The processes report VmHWM
(peak RSS, file-backed memory-mapped pages included) and write their codebooks, which must agree.

    python benchmarks/memory.py [--entries 25000 50000 100000] [--channels 384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cache_verify import evict
from common import machine

from protoquant.cache.store import FeatureStore
from protoquant.cache.synthetic import write_cache
from protoquant.cache.view import CacheView
from protoquant.codebook import kmeans_init, to_patches
from protoquant.config import CodebookConfig
from protoquant.train.codebook import init_codebook

GRID, SHARD, SEED = (7, 7), 512, 0


def old_sample_patches(subset: CacheView, count: int, generator: np.random.Generator) -> torch.Tensor:
    """(count, D) sampled patches through the full float32 maps of their entries (the old way)."""
    cells = GRID[0] * GRID[1]
    picks = np.sort(generator.choice(len(subset.entries) * cells, size=count, replace=False))
    entry_pos, cell = np.divmod(picks, cells)
    unique, inverse = np.unique(entry_pos, return_inverse=True)
    features = to_patches(subset.store.get(subset.entries[unique]))  # (U*H*W, D)
    return features[inverse * cells + cell]


def memory_mb() -> dict[str, float]:
    """VmHWM, RssAnon and RssFile of this process in MB."""
    fields = ("VmHWM", "RssAnon", "RssFile")
    lines = [line.split() for line in Path("/proc/self/status").read_text().splitlines()]
    return {line[0][:-1]: int(line[1]) / 1024 for line in lines if line[0][:-1] in fields}


def child(method: str, folder: Path, config: CodebookConfig, out: Path) -> None:
    """Run one initialisation and print its memory as JSON (the parent starts this process)."""
    torch.set_num_threads(1)
    store = FeatureStore(folder)
    train = CacheView(store, store.entries())
    before = memory_mb()
    start = time.perf_counter()
    if method == "old":
        patches = old_sample_patches(train, config.kmeans_patches, np.random.default_rng(SEED))
        generator = torch.Generator().manual_seed(SEED)
        codebook = kmeans_init(patches, config.num_prototypes, config.kmeans_iters, generator)
    else:
        codebook = init_codebook(train, config, seed=SEED)
    seconds = time.perf_counter() - start
    torch.save(codebook, out)
    print(json.dumps({"before": before, "after": memory_mb(), "seconds": seconds}))


def fake_cache(folder: Path, entries: int, channels: int) -> None:
    """A complete cache of `entries` random float16 maps (one random shard, marked per shard)."""
    block = np.random.default_rng(0).random((SHARD, *GRID, channels), dtype=np.float32).astype(np.float16)

    def maps(first: int, count: int) -> np.ndarray:
        block[0, 0, 0, :] = first // SHARD  # every shard's bytes differ
        return block[:count]

    write_cache(
        folder, np.zeros(entries, dtype=np.int64), maps, grid=GRID, channels=channels, shard_size=SHARD
    )


def measure(method: str, folder: Path, args: argparse.Namespace) -> tuple[dict, torch.Tensor]:
    evict(folder)
    out = folder / f"codebook-{method}.pt"
    command = [sys.executable, __file__, "--child", method, "--folder", str(folder)]
    command += [
        "--patches",
        str(args.patches),
        "--prototypes",
        str(args.prototypes),
        "--iters",
        str(args.iters),
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.splitlines()[-1]), torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, nargs="+", default=[25_000, 50_000, 100_000])
    parser.add_argument(
        "--channels", type=int, default=384, help="D (1280 needs ~16 GB RAM at 25k for 'old')"
    )
    parser.add_argument("--patches", type=int, default=50_000)
    parser.add_argument("--prototypes", type=int, default=512)
    parser.add_argument(
        "--iters", type=int, default=1, help="Lloyd iterations (peak memory does not depend on it)"
    )
    parser.add_argument("--child", choices=["old", "new"])
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    config = CodebookConfig(
        num_prototypes=args.prototypes, kmeans_patches=args.patches, kmeans_iters=args.iters
    )
    if args.child:
        return child(args.child, args.folder, config, args.folder / f"codebook-{args.child}.pt")
    print(
        f"machine: {machine()}; grid {GRID}, D={args.channels}, {args.patches} patches, K={args.prototypes}"
    )
    print(
        "| entries | cache GB | method | peak RSS MB | over baseline MB | file-backed at end MB | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for entries in args.entries:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            folder = Path(tmp)
            fake_cache(folder, entries, args.channels)
            size = sum(p.stat().st_size for p in folder.glob("features-*.npy")) / 1e9
            results = {method: measure(method, folder, args) for method in ("old", "new")}
            for method, (memory, _) in results.items():
                peak, baseline = memory["after"]["VmHWM"], memory["before"]["VmHWM"]
                print(f"| {entries} | {size:.1f} | {method} | {peak:.0f} | {peak - baseline:.0f} | "
                      f"{memory['after']['RssFile']:.0f} | {memory['seconds']:.1f} |")  # fmt: skip
            if not torch.equal(results["old"][1], results["new"][1]):
                raise SystemExit(f"{entries} entries: the old and new codebooks differ")


if __name__ == "__main__":
    main()
