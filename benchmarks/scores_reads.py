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
from protoquant.train.score_tables import ScoresInMemory, ScoresOnDisk, write_rows

IOV_MAX = 1024  # <limits.h>: buffers one preadv may fill


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


class FileRows:
    """Rows of the strided files (row i is row i // W of file i % W), gathered file by file in
    file order by `_part`; the watch looks after each batch."""

    def __init__(self, paths: list[Path], prototypes: int, watch: Watch | None) -> None:
        self.files = [open(path, "rb", buffering=0) for path in paths]
        self.prototypes, self.row_bytes, self.watch = prototypes, prototypes * 2, watch

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.prototypes), dtype=np.float16)
        part_of, local = np.remainder(rows, len(self.files)), rows // len(self.files)
        for part in np.unique(part_of).tolist():
            positions = np.flatnonzero(part_of == part)
            positions = positions[np.argsort(local[positions], kind="stable")]
            self._part(part, local[positions], positions, out)
        if self.watch:
            self.watch.look()
        return out

    def _part(self, part: int, local: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for file in self.files:
            file.close()


class OldPreadv(FileRows):
    """The former `ScoresOnDisk` read: os.preadv into rows of the batch buffer, built run by run."""

    def _part(self, part: int, local: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        starts = np.flatnonzero(np.diff(local, prepend=-2) != 1)
        for first, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(local)]):
            for begin in range(first, stop, IOV_MAX):
                buffers = [out[p] for p in positions[begin : min(stop, begin + IOV_MAX)].tolist()]
                os.preadv(self.files[part].fileno(), buffers, int(local[begin]) * self.row_bytes)


class Mapped(FileRows):
    """Read-only memory maps of the files, one fancy-index gather per file per batch; with `drop`
    the mapped pages are dropped after every batch (after the watch looked)."""

    def __init__(self, paths: list[Path], prototypes: int, watch: Watch | None, drop: bool) -> None:
        super().__init__(paths, prototypes, watch)
        self.maps = [mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) for file in self.files]
        self.arrays = [np.frombuffer(m, np.float16).reshape(-1, prototypes) for m in self.maps]
        self.drop = drop

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = super().rows(rows)
        if self.drop:
            for mapped in self.maps:
                mapped.madvise(mmap.MADV_DONTNEED)
        return out

    def _part(self, part: int, local: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        out[positions] = self.arrays[part][local]

    def close(self) -> None:
        self.arrays.clear()  # the views go before the maps they look into
        for mapped in self.maps:
            mapped.close()
        super().close()


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


class Bench:
    """One table of random scores, its labels and an epoch's order; readers of it by name."""

    NAMES = ("memory", "preadv", "preadv, old", "mmap, dropped", "mmap, kept")

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        torch.manual_seed(0)
        self.args, self.folder = args, folder
        self.table = torch.rand(args.rows, args.prototypes).half()  # (N, K)
        self.labels = torch.randint(0, args.classes, (args.rows,))
        self.order = np.random.default_rng(0).permutation(args.rows)

    def reader(self, name: str, watch: Watch | None = None) -> ScoresInMemory | ScoresOnDisk | FileRows:
        """Reader `name` on freshly written files (none for memory)."""
        if name == "memory":
            return ScoresInMemory(self.table, self.labels)
        shutil.rmtree(self.folder, ignore_errors=True)
        paths, k = (
            write_table(self.table, self.folder, self.args.ranks, self.args.batch),
            self.args.prototypes,
        )
        if name == "preadv":
            reader = (WatchedDisk if watch else ScoresOnDisk)(paths, self.labels, k, torch.float16)
            reader.watch = watch
            return reader
        if name == "preadv, old":
            return OldPreadv(paths, k, watch)
        return Mapped(paths, k, watch, drop=name == "mmap, dropped")

    def batch_of(self, reader: object) -> Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
        """`reader`'s batches as `TrainingScores.batch` delivers them: float32 scores and labels."""
        if isinstance(reader, ScoresInMemory | ScoresOnDisk):
            return reader.batch
        return lambda rows: (torch.from_numpy(reader.rows(rows)).float(), self.labels[torch.from_numpy(rows)])

    def measure(self, name: str) -> tuple[float, float]:
        """(median s/epoch, peak resident MB of a watched epoch on fresh files) of reader `name`,
        after checking one batch against the table."""
        args, probe = self.args, self.order[: self.args.batch]
        reader = self.reader(name)
        batch = self.batch_of(reader)
        scores, labels = batch(probe)
        assert torch.equal(scores.half(), self.table[torch.from_numpy(probe)]), f"{name}: other rows"
        assert torch.equal(labels, self.labels[torch.from_numpy(probe)]), f"{name}: other labels"
        seconds = median_seconds(lambda: epoch(batch, self.order, args.batch), args.repeats)
        reader.close()
        watch = Watch()  # fresh files and maps: nothing of them is resident yet
        reader = self.reader(name, watch)
        epoch(self.batch_of(reader), self.order, args.batch)
        reader.close()
        held = self.table.numel() * 2 / 1e6 if name == "memory" else 0.0  # the table itself
        return seconds, watch.peak + held

    def fit_seconds(self, name: str) -> float:
        """Median seconds of one class-layer epoch on reader `name`."""
        reader = self.reader(name)
        seconds = median_seconds(lambda: fit_epoch(reader, self.args), self.args.repeats)
        reader.close()
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--prototypes", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=1, help="files the table is split over")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=200, help="of the class-layer epoch")
    args = parser.parse_args()
    print(machine())
    print(f"{args.rows} rows x K {args.prototypes} float16 ({args.rows * args.prototypes * 2 / 2**20:.0f} MiB), "
          f"batch {args.batch}, {args.ranks} file(s), median of {args.repeats} epochs in a random order")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        bench, base = Bench(args, Path(scratch) / "table"), None
        for name in Bench.NAMES:
            seconds, resident = bench.measure(name)
            base = base or seconds
            print(
                f"{name:14s} {seconds:6.3f} s/epoch  {seconds / base:5.2f}x memory  resident +{resident:5.0f} MB"
            )
        fits = {name: bench.fit_seconds(name) for name in ("memory", "preadv")}
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
