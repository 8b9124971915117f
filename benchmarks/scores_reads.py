"""Stage 2's batches from its scratch files against the same table in memory.

Writes an (N, K) float16 table of random scores as stage 2 writes it (`write_rows`, one file per
simulated rank) into a temporary folder, deleted afterwards, and times one epoch of batches in a
random order (the order `fit_class_layer` draws) for each reader, in one process, side by side:

- memory: `ScoresInMemory.batch` over the whole table (the path below head.scores_memory_mb);
- preadv: `ScoresOnDisk.batch`, one positioned read per run of adjacent rows into the batch buffer;
- preadv, old: the reader before it, which built its buffer list run by run;
- mmap: memory maps of the files, one vectorised gather per file; "dropped" then drops the mapped
  pages (`madvise(MADV_DONTNEED)`) after every batch, "kept" keeps them (the alternatives to
  positioned reads, measured here to show why the library does not use them).

The files are read from the page cache (written just before; the first, untimed epoch touches
every page). Besides the median epoch time, a separate epoch per reader, on fresh files and maps,
records the largest resident set (RssAnon + RssFile) above the one before it, read after every
gather (for "mmap, dropped" before the drop; for memory the table it holds is added). All readers
must return the same batches.

Then one epoch of `fit_class_layer` (the stage-2 class layer, `--classes` classes, Adam, batch
`--batch`) on the table in memory and from the files, so that the read is seen next to the fit.

    python benchmarks/scores_reads.py [--rows 100000] [--prototypes 2048] [--batch 256]
        [--ranks 1] [--repeats 5] [--classes 200]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import machine, median_seconds

from protoquant.config import HeadConfig
from protoquant.head import NonNegativeLinear
from protoquant.train.head import fit_class_layer
from protoquant.train.scores import ScoresInMemory, ScoresOnDisk, write_rows

IOV_MAX = 1024  # <limits.h>: buffers one preadv may fill
Reader = Callable[[np.ndarray], np.ndarray]  # global rows -> (B, K) float16 rows


def resident_mb() -> float:
    """RssAnon + RssFile of this process in MB."""
    fields = {"RssAnon:", "RssFile:"}
    lines = [line.split() for line in Path("/proc/self/status").read_text().splitlines()]
    return sum(int(line[1]) for line in lines if line[0] in fields) / 1024


class Watch:
    """The largest resident MB above the start, when `look` is called after each gather."""

    def __init__(self) -> None:
        self.start, self.peak = resident_mb(), 0.0

    def look(self) -> None:
        self.peak = max(self.peak, resident_mb() - self.start)


class OldPreadv:
    """The former `ScoresOnDisk` read: os.preadv into rows of the batch buffer, built run by run."""

    def __init__(self, paths: list[Path], prototypes: int, watch: Watch | None = None) -> None:
        self.files = [open(path, "rb", buffering=0) for path in paths]
        self.prototypes, self.row_bytes, self.watch = prototypes, prototypes * 2, watch

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.prototypes), dtype=np.float16)
        part_of, local = np.remainder(rows, len(self.files)), rows // len(self.files)
        for part in np.unique(part_of).tolist():
            positions = np.flatnonzero(part_of == part)
            positions = positions[np.argsort(local[positions], kind="stable")]
            self._read(part, local[positions], positions, out)
        if self.watch:
            self.watch.look()
        return out

    def _read(self, part: int, local: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        starts = np.flatnonzero(np.diff(local, prepend=-2) != 1)
        for first, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(local)]):
            for begin in range(first, stop, IOV_MAX):
                buffers = [out[p] for p in positions[begin : min(stop, begin + IOV_MAX)].tolist()]
                os.preadv(self.files[part].fileno(), buffers, int(local[begin]) * self.row_bytes)

    def close(self) -> None:
        for file in self.files:
            file.close()


class Mapped:
    """Read-only memory maps of the files, one fancy-index gather per file per batch."""

    def __init__(self, paths: list[Path], prototypes: int, drop: bool, watch: Watch | None = None) -> None:
        self.files = [open(path, "rb") for path in paths]
        self.maps = [mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) for file in self.files]
        self.arrays = [np.frombuffer(m, np.float16).reshape(-1, prototypes) for m in self.maps]
        self.prototypes, self.drop, self.watch = prototypes, drop, watch

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.prototypes), dtype=np.float16)
        part_of, local = np.remainder(rows, len(self.files)), rows // len(self.files)
        for part in np.unique(part_of).tolist():
            positions = np.flatnonzero(part_of == part)
            positions = positions[np.argsort(local[positions], kind="stable")]
            out[positions] = self.arrays[part][local[positions]]
        if self.watch:
            self.watch.look()
        if self.drop:
            for m in self.maps:
                m.madvise(mmap.MADV_DONTNEED)
        return out

    def close(self) -> None:
        self.arrays.clear()
        for m, file in zip(self.maps, self.files):
            m.close()
            file.close()


class WatchedDisk(ScoresOnDisk):
    """`ScoresOnDisk` that shows its resident memory to a watch after each read."""

    watch: Watch

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = super().rows(rows)
        self.watch.look()
        return out


def epoch(batch: Callable[[np.ndarray], object], order: np.ndarray, size: int) -> None:
    for first in range(0, len(order), size):
        batch(order[first : first + size])


def write_table(table: torch.Tensor, folder: Path, ranks: int, batch: int) -> list[Path]:
    """The table in `ranks` files, written as stage 2 writes its scores (row i in file i % ranks)."""
    folder.mkdir()
    paths = [folder / f"rank-{rank}" for rank in range(ranks)]
    for rank, path in enumerate(paths):
        write_rows(iter(table[rank::ranks].split(batch)), path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--prototypes", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=1, help="files the table is split over")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=200, help="of the class-layer epoch")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = torch.rand(args.rows, args.prototypes).half()  # (N, K)
    labels = torch.randint(0, args.classes, (args.rows,))
    order = np.random.default_rng(0).permutation(args.rows)
    k = args.prototypes

    def as_batch(read: Reader) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
        """A row reader as `TrainingScores.batch` delivers: float32 scores and labels."""
        return lambda rows: (torch.from_numpy(read(rows)).float(), labels[torch.from_numpy(rows)])

    def disk(paths: list[Path], watch: Watch | None = None) -> ScoresOnDisk:
        reader = (WatchedDisk if watch else ScoresOnDisk)(paths, labels, k, torch.float16)
        reader.watch = watch
        return reader

    makers = {  # name -> (paths, watch) -> (batch function, closer)
        "memory": lambda paths, watch: ScoresInMemory(table, labels),
        "preadv": disk,
        "preadv, old": lambda paths, watch: OldPreadv(paths, k, watch),
        "mmap, dropped": lambda paths, watch: Mapped(paths, k, True, watch),
        "mmap, kept": lambda paths, watch: Mapped(paths, k, False, watch),
    }
    print(machine())
    print(f"{args.rows} rows x K {k} float16 ({table.numel() * 2 / 2**20:.0f} MiB), batch "
          f"{args.batch}, {args.ranks} file(s), median of {args.repeats} epochs in a random order")  # fmt: skip
    probe = order[: args.batch]

    def batch_of(reader: object) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
        return reader.batch if isinstance(reader, ScoresInMemory | ScoresOnDisk) else as_batch(reader.rows)

    def run(name: str, make: Callable, folder: Path, watch: Watch | None) -> object:
        """A reader on freshly written files (none for memory)."""
        if name == "memory":
            return make([], watch)
        shutil.rmtree(folder, ignore_errors=True)
        return make(write_table(table, folder, args.ranks, args.batch), watch)

    with tempfile.TemporaryDirectory() as scratch:
        folder, base = Path(scratch) / "table", None
        for name, make in makers.items():
            reader = run(name, make, folder, None)
            batch = batch_of(reader)
            scores, got = batch(probe)
            assert torch.equal(scores.half(), table[torch.from_numpy(probe)]), f"{name}: other rows"
            assert torch.equal(got, labels[torch.from_numpy(probe)]), f"{name}: other labels"
            seconds = median_seconds(lambda batch=batch: epoch(batch, order, args.batch), args.repeats)
            reader.close()
            base = base or seconds
            watch = Watch()  # fresh files and maps: nothing of them is resident yet
            reader = run(name, make, folder, watch)
            epoch(batch_of(reader), order, args.batch)
            reader.close()
            held = table.numel() * 2 / 1e6 if name == "memory" else 0.0  # the table itself
            print(f"{name:14s} {seconds:6.3f} s/epoch  {seconds / base:5.2f}x memory  "
                  f"resident +{watch.peak + held:5.0f} MB")  # fmt: skip
        fits = {}
        for name in ("memory", "preadv"):
            reader = run(name, makers[name], folder, None)
            fits[name] = median_seconds(lambda reader=reader: fit_epoch(reader, args), args.repeats)
            reader.close()
        print(f"class layer, 1 epoch, {args.classes} classes: {fits['memory']:.3f} s in memory, "
              f"{fits['preadv']:.3f} s from the files ({fits['preadv'] / fits['memory']:.2f}x)")  # fmt: skip


def fit_epoch(table: ScoresInMemory | ScoresOnDisk, args: argparse.Namespace) -> None:
    """One epoch of the stage-2 class layer on `table` (validation: its first batch)."""
    layer = NonNegativeLinear(args.prototypes, args.classes, generator=torch.Generator().manual_seed(0))
    val = table.batch(np.arange(args.batch))
    config = HeadConfig(batch_size=args.batch)
    fit_class_layer(layer, table, val, lr=0.01, epochs=1, config=config, seed=0)


if __name__ == "__main__":
    main()
