"""FunnyBirds as the fine-grained benchmark: accuracy and every FunnyBirds protocol per setting.

Trains on a FunnyBirds folder in the official layout (default: the shared subset,
../shared/funnybirds/FunnyBirds, 50 classes x 10 training images with part maps, 1 test image per
class with every part and background intervention) and reports, for each setting and each
training-split size (--per-class), the test accuracy of the linear probe, the quantized map
through the frozen probe (stage 1), ProtoQuant and the PIP-Net-style head on the same cached
features, every FunnyBirds protocol score for ProtoQuant and the PIP-Net-style head, and the
seconds each stage took. Settings (--settings, comma-separated):

  imagenet   frozen ImageNet MobileNetV2 as shipped, 224 px, 2 training views (7 x 7 grid)
  partscale  the same weights at 448 px, 1 view (14 x 14 grid: a cell is 32 px of the input)
  finetuned  MobileNetV2 fine-tuned on the training split first (stage -1), then as partscale
  finetuned-stages  the same fine-tuned weights, stages 3 and 4 combined (28 x 28 grid at 448 px)

Runs, caches and the fine-tuned weights live under --out; a rerun reuses the feature caches and
a finished fine-tuning (stages 0-2 train again: seconds to minutes). The FunnyBirds protocols run
for the --protocols-at sizes on a seeded stratified sample of --protocol-images test images (the
same for every setting: the interventions re-run the backbone on ~40 renders per image, which
costs minutes per setting at 448 px on 2 CPU cores). --codebook-sweep instead measures stage 1
under one change at a time. Results: <out>/funnybirds.json (or codebook_sweep.json) and markdown
tables on stdout.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/funnybirds.py --out runs/funnybirds
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from common import machine
from interpretability import FB_ROWS

from protoquant.backbones.frozen import create_backbone
from protoquant.config import RunConfig, with_overrides
from protoquant.data import load_splits
from protoquant.distributed import resolve_device
from protoquant.metrics import FeatureMemo, MetricSettings, evaluate_metrics
from protoquant.pipeline import build_caches, resolve_run_config, run, with_backbone_input
from protoquant.train.baseline import baseline_model, train_baseline_head
from protoquant.train.codebook import evaluate_quantized, train_codebook
from protoquant.train.head import evaluate_head
from protoquant.train.probe import evaluate_probe, train_probe

DEFAULT_ROOT = "../shared/funnybirds/FunnyBirds"
BASE = {  # every setting: the library's defaults except these
    "data.dataset": "funnybirds",
    "device": "cpu",
    "cache.num_workers": 2,
    # stage 1 under-fits 450 training images at lr 1e-3 (8 steps per epoch; it keeps 0.72 of the
    # probe's training accuracy): --codebook-sweep measures this change against the others
    "codebook.lr": 5e-3,
}
SETTINGS: dict[str, dict] = {
    "imagenet": {"backbone.image_size": 224, "cache.train_views": 2},
    "partscale": {"backbone.image_size": 448, "cache.train_views": 1},
    "finetuned": {
        "backbone.image_size": 448,
        "cache.train_views": 1,
        "finetune.enabled": True,
        "finetune.image_size": 224,  # a quarter of the 448 px work; the weights are read at 448
        "finetune.epochs": 10,  # ~14 steps per epoch on 450 images: a short, stronger schedule
        "finetune.lr": 5e-4,
        "finetune.head_lr": 5e-3,
        "finetune.warmup_epochs": 1.0,
        "finetune.patience": 0,  # no early stop on 50 validation images (the best epoch is kept)
        "finetune.num_workers": 2,
    },
}
SETTINGS["finetuned-stages"] = {  # the same fine-tuned weights, stages 3 and 4 combined (28 x 28)
    **SETTINGS["finetuned"],
    "backbone.stages": "3,4",
}
CODEBOOK_CHANGES: dict[str, dict] = {  # stage-1 changes measured by --codebook-sweep, one at a time
    "library defaults (lr 1e-3, K 1024, batch 64)": {"codebook.lr": 1e-3},
    "K = 256": {"codebook.lr": 1e-3, "codebook.num_prototypes": 256},
    "K = 4096": {"codebook.lr": 1e-3, "codebook.num_prototypes": 4096},
    "commitment weight 0.1": {"codebook.lr": 1e-3, "codebook.commitment_weight": 0.1},
    "no dead-prototype resets": {"codebook.lr": 1e-3, "codebook.reset_dead_prototypes": False},
    "k-means on 20k patches": {"codebook.lr": 1e-3, "codebook.kmeans_patches": 20_000},
    "batch 16 (4x the steps)": {"codebook.lr": 1e-3, "codebook.batch_size": 16},
    "lr 5e-3 (the benchmark's setting)": {},
}
PROTOCOL_ROWS = {k: v for k, v in FB_ROWS.items() if k not in ("accuracy", "threshold")}


def setting_config(name: str, root: str, out: Path, per_class: int, extra: dict) -> RunConfig:
    """The run config of one setting at `per_class` training images per class (0 = all)."""
    overrides = {
        **BASE,
        **SETTINGS[name],
        **extra,
        "data.root": root,
        "data.max_train_per_class": per_class,
        "cache.root": str(out / "cache"),
        "out": str(out / f"{name}-{per_class or 'all'}"),
    }
    if overrides.get("finetune.enabled"):
        overrides["finetune.out"] = str(out / f"finetune-{per_class or 'all'}")
    return with_overrides(RunConfig(), overrides)


def funnybirds_scores(model, splits, caches, memo: FeatureMemo, images: int) -> dict:
    """Every FunnyBirds protocol (bilinear upsampling, the framework's) on a seeded stratified
    sample of `images` test images (0 = all), the same sample for every setting."""
    settings = MetricSettings(
        seed=model.config.seed, funnybirds_upsampling="bilinear", funnybirds_images=images
    )
    kwargs = {"settings": settings, "store": caches.test.store, "memo": memo}
    report = evaluate_metrics(model, splits.test, ["funnybirds"], **kwargs)
    return report["funnybirds"]


def finetune_record(config: RunConfig) -> dict | None:
    """finetune.json of the setting's fine-tuning (its epochs, best validation accuracy, seconds)."""
    if not config.finetune.enabled:
        return None
    record = json.loads((Path(config.finetune.out) / "finetune.json").read_text())
    history = record.get("history", [])
    return {
        "epochs": len(history),
        "best_val_accuracy": record.get("best_val_accuracy"),
        "seconds": sum(epoch.get("seconds", 0.0) for epoch in history),
    }


def one_setting(config: RunConfig, protocol_images: int | None) -> dict:
    """Train (or reuse) one setting; its accuracies, protocol scores (None: skipped) and seconds."""
    start = time.perf_counter()
    result = run(config)
    seconds = {"run": time.perf_counter() - start, **result.metrics["timing"]}
    model, caches, splits = result.model, result.caches, result.splits
    device = model.head.class_layer.weight.device
    baseline_start = time.perf_counter()
    head, _ = train_baseline_head(
        caches.train, caches.val, len(model.classes), model.config.head, seed=config.seed, device=device
    )
    seconds["pipnet_head"] = time.perf_counter() - baseline_start
    batch = config.codebook.batch_size
    protocols, protocol_start = None, time.perf_counter()
    if protocol_images is not None:
        memo = FeatureMemo()  # both heads share the backbone: re-renders are featurised once
        protocols = {
            "protoquant": funnybirds_scores(model, splits, caches, memo, protocol_images),
            "pipnet": funnybirds_scores(baseline_model(model, head), splits, caches, memo, protocol_images),
        }
    seconds["protocols"] = time.perf_counter() - protocol_start
    metrics = result.metrics
    return {
        "train_images": len(splits.train),
        "val_images": len(splits.val),
        "test_images": len(splits.test),
        "grid": metrics["backbone"]["grid"],
        "accuracy": {
            "linear_probe": metrics["linear_probe"]["test_accuracy"],
            "quantized": metrics["quantized"]["test_accuracy"],
            "protoquant": metrics["protoquant"]["test_accuracy"],
            "pipnet": evaluate_head(head, caches.test, batch, device),
        },
        "val_accuracy": {
            "linear_probe": metrics["linear_probe"]["val_accuracy"],
            "quantized": metrics["quantized"]["val_accuracy"],
            "protoquant": metrics["protoquant"]["val_accuracy"],
        },
        "protoquant_prototypes": metrics["protoquant"]["num_prototypes"],
        "finetune": finetune_record(config),
        "protocols": protocols,
        "seconds": seconds,
    }


def codebook_sweep(config: RunConfig) -> dict[str, dict]:
    """Stage 0 once, then stage 1 under each of CODEBOOK_CHANGES: the quantized accuracy on view 0
    of the training images, validation and test, next to the probe's."""
    config = resolve_run_config(config)
    device = resolve_device(config.device)
    splits = load_splits(config.data, config.seed)
    backbone = create_backbone(config.backbone)
    config = with_backbone_input(config, backbone)
    caches = build_caches(splits, backbone, config, device)
    classes = splits.train.num_classes
    probe = train_probe(caches.train, caches.val, classes, config.probe, seed=config.seed, device=device)
    subsets = {"train": caches.train_plain, "val": caches.val, "test": caches.test}
    rows = {"linear probe": {name: evaluate_probe(probe, subset, device) for name, subset in subsets.items()}}
    for label, change in CODEBOOK_CHANGES.items():
        changed = with_overrides(config, change)
        start = time.perf_counter()
        quantizer, _ = train_codebook(
            caches.train, caches.val, probe, changed.codebook, seed=config.seed, device=device
        )
        batch = changed.codebook.batch_size
        rows[label] = {
            name: evaluate_quantized(quantizer, probe, subset, batch, device)
            for name, subset in subsets.items()
        }
        rows[label]["seconds"] = time.perf_counter() - start
        print(label, rows[label], flush=True)
    return rows


def sweep_table(rows: dict[str, dict]) -> str:
    lines = ["| stage 1 | train (view 0) | val | test | seconds |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        seconds = f"{r['seconds']:.0f}" if "seconds" in r else "—"
        lines.append(f"| {label} | {_pct(r['train'])} | {_pct(r['val'])} | {_pct(r['test'])} | {seconds} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def accuracy_table(results: dict[str, dict]) -> str:
    lines = [
        "| setting | train imgs | grid | linear probe | stage 1 quantized | ProtoQuant | PIP-Net-style head |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        acc, grid = r["accuracy"], " × ".join(str(g) for g in r["grid"])
        lines.append(
            f"| {name} | {r['train_images']} | {grid} | {_pct(acc['linear_probe'])} | "
            f"{_pct(acc['quantized'])} | {_pct(acc['protoquant'])} | {_pct(acc['pipnet'])} |"
        )
    return "\n".join(lines)


def protocol_table(results: dict[str, dict]) -> str:
    columns = [(n, head) for n in results if results[n]["protocols"] for head in ("protoquant", "pipnet")]
    header = " | ".join(f"{name} {'PQ' if head == 'protoquant' else 'PIP'}" for name, head in columns)
    lines = [f"| protocol | {header} |", "|---" * (len(columns) + 1) + "|"]
    for key, label in PROTOCOL_ROWS.items():
        cells = " | ".join(f"{results[n]['protocols'][h][key]:.3f}" for n, h in columns)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def seconds_table(results: dict[str, dict]) -> str:
    lines = [
        "| setting | fine-tune | cache | stages 0-2 | PIP-Net head | protocols |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s, ft = r["seconds"], r["finetune"]
        tune = f"{ft['seconds']:.0f} ({ft['epochs']} epochs)" if ft else "—"
        lines.append(
            f"| {name} | {tune} | {s['cache_seconds']:.0f} | {s['train_seconds']:.0f} | "
            f"{s['pipnet_head']:.0f} | {s['protocols']:.0f} |"
        )
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="FunnyBirds folder (official layout)")
    parser.add_argument("--out", default="runs/funnybirds")
    parser.add_argument("--settings", default="imagenet,partscale,finetuned")
    parser.add_argument(
        "--per-class", default="10,5", help="training images per class (0 = all; '' = only print the tables)"
    )
    parser.add_argument(
        "--protocols-at",
        default="10",
        help="per-class sizes whose runs also get the FunnyBirds protocols (comma-separated)",
    )
    parser.add_argument(
        "--protocol-images", type=int, default=20, help="test images the protocols score (0 = all)"
    )
    parser.add_argument(
        "--codebook-sweep",
        action="store_true",
        help="only measure stage 1 under each codebook change (partscale setting, 10 images per class)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="extra override for every setting"
    )
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    if not Path(args.root).is_dir():
        raise SystemExit(f"FunnyBirds folder {args.root} not found (pass --root)")
    out = Path(args.out)
    extra = dict(item.split("=", 1) for item in args.set)
    if args.codebook_sweep:
        rows = codebook_sweep(setting_config("partscale", args.root, out, 10, extra))
        out.mkdir(parents=True, exist_ok=True)
        (out / "codebook_sweep.json").write_text(json.dumps(rows, indent=2))
        print(f"{machine()}\n\n{sweep_table(rows)}")
        return
    record = out / "funnybirds.json"  # results of earlier invocations are kept (same keys replaced)
    results = json.loads(record.read_text()) if record.is_file() else {}
    for per_class in (int(n) for n in args.per_class.split(",") if n):
        for name in args.settings.split(","):
            config = setting_config(name, args.root, out, per_class, extra)
            images = args.protocol_images if str(per_class) in args.protocols_at.split(",") else None
            results[f"{name}, {per_class or 'all'}/class"] = one_setting(config, images)
            out.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(results, indent=2))
    print(f"{machine()}\n")
    print(accuracy_table(results), "\n")
    print(protocol_table(results), "\n")
    print(seconds_table(results))


if __name__ == "__main__":
    main()
