"""Peak memory of the k-means initialisation, of stage 1 and of stage 2 against the cache size.

k-means initialisation: full-map gather (old) against cell reads (new).

For each cache size, writes a complete cache of random float16 maps (the library's own shard
writer, shards of 512) into a temporary folder, deleted afterwards, and runs `init_codebook`
(kmeans_patches patches, K prototypes) in a fresh process per method, one thread, the cache's
pages evicted first. "old" is the former `sample_patches`: it loads the full float32 map of every
entry that gives at least one sampled patch, then picks the patches. The processes report VmHWM
(peak RSS, file-backed memory-mapped pages included) and write their codebooks, which must agree.

Stage 1 and stage 2 (`--parts stage1 stage2`): a second cache of random (1, 1, D) maps with
10 cyclic labels, the last 1,000 entries for validation (a 1 x 1 grid keeps the backbone-free
scoring fast; the (N, K) table of stage 2 does not depend on the grid). "stage1" runs
`train_codebook` (its k-means initialisation and one epoch, streamed). "memory" and "file" run
`train_head` (scores at K = `--head-prototypes`, `--head-epochs` epochs, the top-k cut and one
fine-tuning epoch) with head.scores_memory_mb above the table and at 1 MiB (the scratch-file
path); their class weights must be equal. Besides VmHWM each child samples its anonymous RSS
every 5 ms (file-backed pages of the memory-mapped cache are reclaimable, anonymous ones not).

`--device cuda` runs every child on the GPU and adds its max allocated memory
(`torch.cuda.max_memory_allocated`, reset when the child starts). Stage 1 streams its maps
(`--resident stream`, the path whose memory does not depend on N); `--resident auto` shows the
loaded path, whose GPU memory grows with the cache by design.

    python benchmarks/memory.py [--entries 25000 50000 100000] [--channels 384]
        [--parts kmeans stage1 stage2] [--device cuda] [--resident stream|auto|device]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
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
from protoquant.config import CacheConfig, CodebookConfig, HeadConfig
from protoquant.train.codebook import init_codebook, train_codebook
from protoquant.train.head import train_head

GRID, SHARD, SEED = (7, 7), 512, 0
STAGE_GRID, CLASSES, VAL_ENTRIES = (1, 1), 10, 1000  # the stage 1 / stage 2 cache
SAMPLE_SECONDS = 0.005  # how often a child samples its anonymous RSS
BIG, SMALL = 1_000_000, 1  # head.scores_memory_mb of the "memory" and "file" runs


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


def gpu_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    """Max memory allocated on `device` since `gpu_start`, in MB (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def child(method: str, folder: Path, config: CodebookConfig, out: Path, device: torch.device) -> None:
    """Run one initialisation and print its memory as JSON (the parent starts this process)."""
    torch.set_num_threads(1)
    gpu_start(device)
    store = FeatureStore(folder)
    train = CacheView(store, store.entries())
    before = memory_mb()
    start = time.perf_counter()
    if method == "old":
        patches = old_sample_patches(train, config.kmeans_patches, np.random.default_rng(SEED))
        generator = torch.Generator().manual_seed(SEED)
        codebook = kmeans_init(patches.to(device), config.num_prototypes, config.kmeans_iters, generator)
    else:
        codebook = init_codebook(train, config, seed=SEED, device=device)
    seconds = time.perf_counter() - start
    torch.save(codebook.cpu(), out)
    report = {"before": before, "after": memory_mb(), "seconds": seconds, "gpu_peak": gpu_peak_mb(device)}
    print(json.dumps(report))


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
    for flag in (
        "patches",
        "prototypes",
        "iters",
        "head_prototypes",
        "head_epochs",
        "channels",
        "device",
        "resident",
    ):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:  # the child's own error, not only its exit status
        sys.exit(f"memory.py: the '{method}' child failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1]), torch.load(out)


class AnonPeak:
    """The largest RssAnon seen by a thread that reads /proc/self/status every SAMPLE_SECONDS."""

    def __init__(self) -> None:
        self.peak, self._stop = memory_mb()["RssAnon"], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, memory_mb()["RssAnon"])

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, memory_mb()["RssAnon"])


def stage_child(method: str, folder: Path, args: argparse.Namespace, out: Path) -> None:
    """Run stage 1 or stage 2 on the stage cache and print its memory as JSON."""
    torch.set_num_threads(1)
    device = torch.device(args.device)
    gpu_start(device)
    store = FeatureStore(folder)
    entries = store.entries()
    train, val = CacheView(store, entries[:-VAL_ENTRIES]), CacheView(store, entries[-VAL_ENTRIES:])
    before, sampler, start = memory_mb(), AnonPeak(), time.perf_counter()
    if method == "stage1":
        probe = torch.nn.Linear(args.channels, CLASSES)
        config = CodebookConfig(
            num_prototypes=args.prototypes, kmeans_patches=args.patches, kmeans_iters=args.iters,
            epochs=1, cutmix_prob=0.0,
        )  # fmt: skip
        cache = CacheConfig(resident=args.resident)
        result = train_codebook(train, val, probe, config, seed=SEED, device=device, cache=cache)[0].codebook
    else:
        codebook = torch.randn(
            args.head_prototypes, args.channels, generator=torch.Generator().manual_seed(SEED)
        )
        config = HeadConfig(
            epochs=args.head_epochs, top_k_epochs=1, scores_memory_mb=BIG if method == "memory" else SMALL
        )
        usage = torch.ones(len(codebook))
        head, _ = train_head(
            codebook.to(device), usage, train, val, CLASSES, config, seed=SEED, device=device
        )
        result = head.class_layer.weight.detach()
    seconds, peak_anon = time.perf_counter() - start, sampler.stop()
    torch.save(result.cpu(), out)
    report = {"before": before, "after": memory_mb(), "peak_anon": peak_anon, "seconds": seconds}
    print(json.dumps(report | {"gpu_peak": gpu_peak_mb(device)}))


def stage_cache(folder: Path, entries: int, channels: int) -> None:
    """A complete cache of `entries` random (1, 1, D) maps, labels cycling over CLASSES."""
    block = np.random.default_rng(1).random((SHARD, *STAGE_GRID, channels), dtype=np.float32)

    def maps(first: int, count: int) -> np.ndarray:
        block[0, 0, 0, :] = first // SHARD  # every shard's bytes differ
        return block[:count].astype(np.float16)

    labels = np.arange(entries) % CLASSES
    write_cache(folder, labels, maps, grid=STAGE_GRID, channels=channels, shard_size=SHARD)


def gpu(memory: dict) -> str:
    """The GPU max-allocated column: MB, or "-" for a CPU run."""
    return "-" if memory.get("gpu_peak") is None else f"{memory['gpu_peak']:.0f}"


def check_same(a: torch.Tensor, b: torch.Tensor, what: str, args: argparse.Namespace) -> None:
    """Bit-identical on the CPU; on CUDA, whose atomic float sums (index_add_) are not ordered, equal
    to float tolerance (the largest difference printed)."""
    if torch.equal(a, b):
        return
    if args.device == "cuda" and torch.allclose(a, b, rtol=1e-4, atol=1e-6):
        print(f"{what}: equal to float tolerance on CUDA (max |difference| {(a - b).abs().max().item():.2e})")
        return
    raise SystemExit(f"{what} differ (max |difference| {(a - b).abs().max().item():.2e})")


def kmeans_rows(entries: int, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        fake_cache(folder, entries, args.channels)
        size = sum(p.stat().st_size for p in folder.glob("features-*.npy")) / 1e9
        results = {method: measure(method, folder, args) for method in ("old", "new")}
        for method, (memory, _) in results.items():
            peak, baseline = memory["after"]["VmHWM"], memory["before"]["VmHWM"]
            print(f"| {entries} | {size:.1f} | {method} | {peak:.0f} | {peak - baseline:.0f} | "
                  f"{memory['after']['RssFile']:.0f} | {gpu(memory)} | {memory['seconds']:.1f} |")  # fmt: skip
        check_same(
            results["old"][1], results["new"][1], f"{entries} entries: the old and new codebooks", args
        )


def stage_rows(entries: int, args: argparse.Namespace) -> None:
    methods = (["stage1"] if "stage1" in args.parts else []) + (
        ["memory", "file"] if "stage2" in args.parts else []
    )
    table_mb = (entries - VAL_ENTRIES) * args.head_prototypes * 4 / 2**20
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        stage_cache(folder, entries, args.channels)
        results = {method: measure(method, folder, args) for method in methods}
        for method, (memory, _) in results.items():
            peak, baseline = memory["after"]["VmHWM"], memory["before"]["VmHWM"]
            table = "" if method == "stage1" else f"{table_mb:.0f}"
            print(f"| {entries} | {method} | {table} | {peak:.0f} | {peak - baseline:.0f} | "
                  f"{memory['peak_anon'] - memory['before']['RssAnon']:.0f} | "
                  f"{memory['after']['RssFile']:.0f} | {gpu(memory)} | {memory['seconds']:.1f} |")  # fmt: skip
        if "stage2" in args.parts:
            check_same(
                results["memory"][1],
                results["file"][1],
                f"{entries} entries: the class weights of memory and file",
                args,
            )
        if any(p.name.startswith(".scores") for p in folder.iterdir()):
            raise SystemExit(f"{entries} entries: stage 2 left its scratch scores in {folder}")


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
    parser.add_argument("--head-prototypes", type=int, default=2048, help="K of the stage-2 runs")
    parser.add_argument("--head-epochs", type=int, default=2, help="class-layer epochs of the stage-2 runs")
    parser.add_argument(
        "--parts", nargs="+", choices=["kmeans", "stage1", "stage2"], default=["kmeans", "stage1", "stage2"]
    )
    parser.add_argument("--device", default="cpu", help="where the children train (cpu, cuda)")
    parser.add_argument(
        "--resident", default="stream", choices=["stream", "auto", "device"], help="stage 1's cache.resident"
    )
    parser.add_argument("--child", choices=["old", "new", "stage1", "memory", "file"])
    parser.add_argument("--folder", type=Path)
    args = parser.parse_args()
    config = CodebookConfig(
        num_prototypes=args.prototypes, kmeans_patches=args.patches, kmeans_iters=args.iters
    )
    if args.child in ("old", "new"):
        out = args.folder / f"codebook-{args.child}.pt"
        return child(args.child, args.folder, config, out, torch.device(args.device))
    if args.child:
        return stage_child(args.child, args.folder, args, args.folder / f"codebook-{args.child}.pt")
    cells = GRID[0] * GRID[1]
    if "kmeans" in args.parts and min(args.entries) * cells < args.patches:
        parser.error(f"--entries: k-means samples {args.patches} cells, more than {min(args.entries)} entries "
                     f"of {cells} cells hold; use more entries or fewer --patches")  # fmt: skip
    print(f"machine: {machine()}; device {args.device}; D={args.channels}, {args.patches} patches, "
          f"K={args.prototypes}; stage 1 resident={args.resident}")  # fmt: skip
    if "kmeans" in args.parts:
        print(f"\nk-means initialisation, grid {GRID}")
        print(
            "| entries | cache GB | method | peak RSS MB | over baseline MB | file-backed at end MB "
            "| GPU max allocated MB | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for entries in args.entries:
            kmeans_rows(entries, args)
    if {"stage1", "stage2"} & set(args.parts):
        print(f"\nstage 1 (K={args.prototypes}, init + 1 epoch) and stage 2 (K={args.head_prototypes}, "
              f"{args.head_epochs} epochs + top-k cut), grid {STAGE_GRID}, {CLASSES} classes")  # fmt: skip
        print("| entries | run | scores table MB | peak RSS MB | over baseline MB | peak anon over baseline MB "
              "| file-backed at end MB | GPU max allocated MB | seconds |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for entries in args.entries:
            stage_rows(entries, args)


if __name__ == "__main__":
    main()
