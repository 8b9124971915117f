"""The reference runs, datasets and images every case copies instead of rebuilding.

Each is built once, by the first case that needs it (so `--only` builds only what its cases
read), in its own folder with relative paths (`--out run`, the cache in `$PROTOQUANT_CACHE` =
`<folder>/cache`), so a copy into a case's folder works as the original did:

- `tiny`: the tests' tiny config (3 synthetic classes, `timm/test_convnext`, random weights)
  with 4-entry shards, so the training cache has several shards to damage, and its
  `predict --json` answer on `images`;
- `kill0` / `kill1`: a longer config (seed 0 / seed 1) whose caching and stages take long
  enough to be interrupted; the seed-0 run's stderr lines are timed (`timeline`, `wall`);
- `images`: PNG files to classify, `folder`: an image-folder dataset (3 classes x 10 PNG
  files) and `cub`: a minimal CUB-200-2011 layout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fault_cases.harness import COMMAND_TIMEOUT, Proc, Workspace, strict_json

MODEL_FLAGS = [
    "--backbone.name", "timm/test_convnext", "--backbone.weights", "none", "--backbone.image_size", "64",
    "--cache.train_views", "1", "--cache.shard_size", "4", "--cache.num_workers", "0",
    "--codebook.num_prototypes", "8", "--codebook.epochs", "2", "--codebook.kmeans_patches", "500",
    "--probe.epochs", "5", "--head.epochs", "5", "--head.temperature_grid", "", "--head.lr_grid", "",
]  # fmt: skip
TINY_DATA = [
    "--data.synthetic_classes", "3", "--data.synthetic_train_per_class", "6",
    "--data.synthetic_test_per_class", "3",
]  # fmt: skip
TINY = ["train", "--out", "run", *TINY_DATA, *MODEL_FLAGS]
KILL = [
    "train", "--out", "run", "--backbone.name", "timm/test_convnext", "--backbone.weights", "none",
    "--backbone.image_size", "64", "--data.synthetic_classes", "4",
    "--data.synthetic_train_per_class", "50", "--data.synthetic_test_per_class", "10",
    "--cache.train_views", "2", "--cache.shard_size", "16", "--cache.batch_size", "8",
    "--cache.num_workers", "0", "--codebook.num_prototypes", "16", "--codebook.epochs", "100",
    "--codebook.kmeans_patches", "2000", "--probe.epochs", "1500", "--head.epochs", "400",
    "--head.top_k_epochs", "400", "--head.temperature_grid", "", "--head.lr_grid", "",
]  # fmt: skip
FOLDER_CLASSES, FOLDER_IMAGES = 3, 10  # image-folder reference: classes x images per class
PICTURES = 2  # PNG files in `images`


@dataclass
class Timed:
    """A command whose stderr lines were read as they came, with the seconds since its start."""

    proc: Proc
    lines: list[tuple[float, str]]


def run_timed(ws: Workspace, args: list[str], *, kill_when=None) -> Timed:
    """Run a command, timing each stderr line; `kill_when(ws, seconds, lines)` -> True kills it.

    The harness polls `kill_when` every millisecond while the command runs and sends SIGKILL
    to the command's process group; `proc.rc` is None after a kill or a hang.
    """
    start = time.perf_counter()
    popen = ws.start(args)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in popen.stderr:  # appended one by one: `kill_when` sees each as it comes
            lines.append((time.perf_counter() - start, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    while popen.poll() is None:
        elapsed = time.perf_counter() - start
        if elapsed > COMMAND_TIMEOUT or (kill_when is not None and kill_when(ws, elapsed, lines)):
            os.killpg(popen.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    popen.wait()
    reader.join(timeout=10)
    out = popen.stdout.read()
    rc = None if killed or popen.returncode < 0 else popen.returncode
    return Timed(Proc(args, rc, out, "".join(line for _, line in lines), time.perf_counter() - start), lines)


def _build_run(folder: Path, args: list[str]) -> Timed:
    folder.mkdir(parents=True)
    timed = run_timed(Workspace(folder, None), args)
    if timed.proc.rc != 0:
        tail = timed.proc.stderr[-2000:]
        raise RuntimeError(f"reference run {folder.name} failed (exit {timed.proc.rc}):\n{tail}")
    return timed


def _write_pictures(root: Path) -> None:
    """PNG files to classify (`images/`) and an image-folder dataset (`folder/`)."""
    from protoquant.data.synthetic import SyntheticParts

    (root / "images").mkdir()
    test = SyntheticParts("test", num_classes=3, images_per_class=PICTURES, image_size=64, seed=0)
    for i in range(PICTURES):
        test.load_image(i).save(root / "images" / f"picture{i}.png")
    pool = SyntheticParts("train", num_classes=FOLDER_CLASSES, images_per_class=FOLDER_IMAGES, seed=1)
    for i in range(len(pool)):
        target = root / "folder" / f"class{int(pool.labels[i])}"
        target.mkdir(parents=True, exist_ok=True)
        pool.load_image(i).save(target / f"image{i:03d}.png")


def _write_cub(root: Path) -> None:
    """A minimal CUB_200_2011 folder (`cub/`): 2 classes x 6 images (3 train, 3 test each), 1 part."""
    cub = root / "cub" / "CUB_200_2011"
    (cub / "parts").mkdir(parents=True)
    pictures = root / "folder"
    sources = sorted((pictures / "class0").iterdir())[:6] + sorted((pictures / "class1").iterdir())[:6]
    rows = []
    for image_id, source in enumerate(sources, 1):
        label = 1 if image_id <= len(sources) // 2 else 2
        relative = f"{label:03d}.bird{label}/img{image_id}.png"
        (cub / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, cub / "images" / relative)
        rows.append((image_id, relative, label, image_id % 2))
    tables = {
        "images.txt": [f"{i} {path}" for i, path, _, _ in rows],
        "image_class_labels.txt": [f"{i} {label}" for i, _, label, _ in rows],
        "train_test_split.txt": [f"{i} {train}" for i, _, _, train in rows],
        "classes.txt": ["1 001.bird1", "2 002.bird2"],
        "bounding_boxes.txt": [f"{i} 4.0 4.0 40.0 40.0" for i, *_ in rows],
        "parts/parts.txt": ["1 beak"],
        "parts/part_locs.txt": [f"{i} 1 20.0 20.0 1" for i, *_ in rows],
    }
    for name, lines in tables.items():
        (cub / name).write_text("\n".join(lines) + "\n")


class References:
    """Everything the cases copy, each part built on first use (thread-safe) below `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._built: dict[str, object] = {}

    def _once(self, name: str, build):
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._built:
                self._built[name] = build()
        return self._built[name]

    def _pictures(self) -> Path:
        def build() -> Path:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_pictures(self.root)
            _write_cub(self.root)
            return self.root

        return self._once("pictures", build)

    def _run(self, name: str, args: list[str]) -> Timed:
        return self._once(name, lambda: _build_run(self.root / name, args))

    @property
    def images(self) -> Path:
        return self._pictures() / "images"

    @property
    def folder(self) -> Path:
        return self._pictures() / "folder"

    @property
    def cub(self) -> Path:
        return self._pictures() / "cub"

    @property
    def tiny(self) -> Path:
        self._run("tiny", TINY)
        return self.root / "tiny"

    @property
    def kill0(self) -> Path:
        self._run("kill0", KILL)
        return self.root / "kill0"

    @property
    def kill1(self) -> Path:
        self._run("kill1", [*KILL, "--seed", "1"])
        return self.root / "kill1"

    def metrics(self, name: str) -> dict:
        """metrics.json of the reference run `name` (tiny, kill0 or kill1)."""
        return json.loads((getattr(self, name) / "run" / "metrics.json").read_text())

    @property
    def tiny_metrics(self) -> dict:
        return self.metrics("tiny")

    @property
    def timeline(self) -> list[tuple[float, str]]:
        """The timed stderr lines of the seed-0 kill run."""
        return self._run("kill0", KILL).lines

    @property
    def wall(self) -> float:
        """The seed-0 kill run's wall time, seconds."""
        return self._run("kill0", KILL).proc.seconds

    @property
    def predictions(self) -> dict:
        """`predict --json` of the tiny model on `images`."""

        def build() -> dict:
            files = [str(self.images / f"picture{i}.png") for i in range(PICTURES)]
            done = Workspace(self.tiny, None).cli(["predict", "--model", "run/model", "--json", *files])
            if done.rc != 0:
                raise RuntimeError(f"reference predict failed:\n{done.stderr[-2000:]}")
            return strict_json(done.stdout)

        return self._once("predictions", build)
