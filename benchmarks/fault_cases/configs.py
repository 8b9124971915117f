"""Bad config values, flags, YAML files and devices given to `train` over a complete run.

Right means an error naming the flag, field or file before any work, with the complete run in
`--out` still loadable. Exit 0 is wrong for all of them (the value was accepted), except where a
case says otherwise (orthogonal init with K > D may be handled; `--device cuda` on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path

from fault_cases.harness import (
    HANDLED,
    NAMED,
    Case,
    Outcome,
    Workspace,
    finite_metrics_problem,
    judge,
    unloadable,
)
from fault_cases.references import TINY

FLAGS = {  # name -> (flags added to the tiny run, words one of which the error must name)
    "head-temperature-0": (["--head.temperature", "0"], ("head.temperature",)),
    "head-temperature-negative": (["--head.temperature", "-0.1"], ("head.temperature",)),
    "tau-grid-minus1-0": (["--head.temperature_grid", "-1,0"], ("head.temperature_grid",)),
    "max-train-per-class-negative": (["--data.max_train_per_class", "-1"], ("data.max_train_per_class",)),
    "num-prototypes-0": (["--codebook.num_prototypes", "0"], ("codebook.num_prototypes",)),
    "codebook-epochs-0": (["--codebook.epochs", "0"], ("codebook.epochs",)),
    "shard-size-0": (["--cache.shard_size", "0"], ("cache.shard_size",)),
    "cache-batch-size-0": (["--cache.batch_size", "0"], ("cache.batch_size",)),
    "grid-pool-0": (["--cache.grid_pool", "0"], ("cache.grid_pool",)),
    "top-k-per-class-negative": (["--head.top_k_per_class", "-2"], ("head.top_k_per_class",)),
    "val-fraction-0": (["--data.val_fraction", "0"], ("data.val_fraction",)),
    "test-fraction-0": (["--data.test_fraction", "0"], ("data.test_fraction",)),
    "cutmix-prob-3": (["--codebook.cutmix_prob", "3"], ("codebook.cutmix_prob",)),
    "crop-ratio-2": (["--backbone.crop_ratio", "2"], ("backbone.crop_ratio",)),
    "image-size-8": (["--backbone.image_size", "8"], ("backbone.image_size",)),
    "mean-two-values": (["--backbone.mean", "0.5,0.5"], ("backbone.mean",)),
    "std-zero": (["--backbone.std", "0,0,0"], ("backbone.std",)),
    "init-choice-kmean": (["--codebook.init", "kmean"], ("codebook.init",)),
    "scores-dtype-float64": (["--head.scores_dtype", "float64"], ("head.scores_dtype",)),
    "string-for-int": (["--codebook.num_prototypes", "many"], ("codebook.num_prototypes",)),
    "float-for-int": (["--probe.epochs", "1.5"], ("probe.epochs",)),
    "string-for-float": (["--head.lr", "fast"], ("head.lr",)),
    "bad-bool": (["--codebook.snap_to_patches", "maybe"], ("codebook.snap_to_patches",)),
    "seed-not-int": (["--seed", "x"], ("seed",)),
    "unknown-section-flag": (["--codebook.num_codez", "5"], ("codebook.num_codez",)),
    "unknown-flag": (["--frobnicate"], ("frobnicate",)),
    "abbreviated-flag": (["--codebook.num", "5"], ("--codebook.num_prototypes",)),
    "orthogonal-k-above-dims": (
        ["--codebook.init", "orthogonal", "--codebook.num_prototypes", "128"],
        ("num_prototypes", "orthogonal"),
    ),
}
YAML = {  # name -> (file text or bytes, words one of which the error must name)
    "yaml-unknown-key": ("codebook:\n  num_codez: 5\n", ("codebook.num_codez",)),
    "yaml-bad-syntax": ("codebook: [1, 2\nhead: {\n", ("run.yaml",)),
    "yaml-wrong-type": ("codebook:\n  num_prototypes: many\n", ("codebook.num_prototypes",)),
    "yaml-negative-value": ("codebook:\n  num_prototypes: -3\n", ("codebook.num_prototypes",)),
    "yaml-null-value": ("codebook:\n  num_prototypes: null\n", ("codebook.num_prototypes",)),
    "yaml-list-for-int": ("probe:\n  epochs: [1, 2]\n", ("probe.epochs",)),
    "yaml-section-not-mapping": ("codebook: 5\n", ("codebook",)),
    "yaml-top-level-list": ("- 1\n- 2\n", ("run.yaml",)),
    "yaml-not-utf8": (b"seed: \xff\xfe\n", ("run.yaml",)),
    "yaml-missing-file": (None, ("run.yaml",)),
}
DEVICES = {
    "device-cuda": ("cuda", ("cuda",)),
    "device-cuda-7": ("cuda:7", ("cuda:7",)),
    "device-tpu": ("tpu", ("device",)),
    "device-mps": ("mps", ("mps",)),
}


def _accepted(ws: Workspace, handled_ok: bool):
    """The result check: exit 0 is right only when `handled_ok` and the run is complete and finite."""

    def check() -> str | None:
        if not handled_ok:
            return "the bad value was accepted and the run finished"
        return finite_metrics_problem(ws.dir / "run" / "metrics.json")

    return check


def train_case(name: str, kind: str, args, names, *, handled_ok: bool = False, setup=None) -> Case:
    def run(ws: Workspace) -> Outcome:
        run_dir = ws.copy_run(ws.refs.tiny)
        if setup:
            setup(ws.dir)
        proc = ws.cli(args)
        return judge(
            proc, names=names, check=_accepted(ws, handled_ok), lost=lambda: unloadable(run_dir / "model")
        )

    return Case(name, kind, run, accept=(NAMED, HANDLED) if handled_ok else (NAMED,))


def _yaml_setup(content):
    def setup(folder: Path) -> None:
        if content is not None:
            path = folder / "run.yaml"
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return setup


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cases(refs) -> list[Case]:
    out = [
        train_case(
            f"config-{name}", "bad config", [*TINY, *flags], names, handled_ok=name.startswith("orthogonal")
        )
        for name, (flags, names) in FLAGS.items()
    ]
    out += [
        train_case(
            name, "bad config", ["train", "--config", "run.yaml", *TINY[1:]], names, setup=_yaml_setup(text)
        )
        for name, (text, names) in YAML.items()
    ]
    out.append(
        train_case(
            "config-out-is-a-file",
            "bad config",
            [*TINY, "--out", "taken.txt"],
            ("taken.txt",),
            setup=lambda folder: (folder / "taken.txt").write_text("not a folder"),
        )
    )
    gpus = _cuda_devices()
    for name, (device, names) in DEVICES.items():
        index = int(device.split(":")[1]) if ":" in device else 0
        exists = device.startswith("cuda") and index < gpus
        out.append(train_case(name, "device", [*TINY, "--device", device], names, handled_ok=exists))
    return out
