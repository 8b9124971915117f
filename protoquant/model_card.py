"""The model card (`README.md`) that `save_pretrained` writes: Hub front matter, then facts.

Everything on the card is read from the model and the run's metrics; a fact that was not
recorded says so instead of being guessed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

import protoquant
from protoquant.backbones.stages import describe_scale
from protoquant.config import WEIGHT_THRESHOLD, to_dict

if TYPE_CHECKING:  # the model's hub methods call into this module: hints only
    import torch


MAX_LISTED_CLASSES = 100  # longer class lists are cut on the card (config.json keeps them all)
STAGES = (  # (metrics.json section, row label) of the accuracy table
    ("linear_probe", "linear probe on pooled features (reference)"),
    ("quantized", "stage 1: quantized features through the probe"),
    ("protoquant", "ProtoQuant (interpretable head)"),
)
REPO_PLACEHOLDER = "OWNER/REPO"


def model_card(
    model: protoquant.ProtoQuant,
    metrics: dict,
    *,
    license: str | None = None,
    repo_id: str | None = None,
    with_gallery: bool = False,
) -> str:
    """The card's markdown: YAML front matter, model facts, accuracy, classes, usage, config.

    Args:
        metrics: the run's metrics.json ({} when unknown: the card says accuracy was not recorded).
        with_gallery: whether the folder holds the prototype gallery (the usage snippet differs).
    """
    sections = (
        _front_matter(model, metrics, license),
        _summary(model, metrics),
        _facts(model, metrics),
        _accuracy(metrics, edited=bool(model.edits)),
        _history(model),
        _classes(model),
        _usage(model, repo_id or REPO_PLACEHOLDER, with_gallery),
        "## Training config\n\n```yaml\n" + yaml.safe_dump(to_dict(model.config), sort_keys=False) + "```\n",
    )
    return "\n".join(sections)


def explanation_size(model: protoquant.ProtoQuant) -> tuple[int, float]:
    """(prototypes with max_c w[c, k] > WEIGHT_THRESHOLD, mean over classes of #{k : w[c, k] > it})."""
    return weights_size(model.head.class_weights)


def weights_size(class_weights: torch.Tensor) -> tuple[int, float]:
    """`explanation_size` of class weights (C, K)."""
    used = class_weights.detach().cpu() > WEIGHT_THRESHOLD  # (C, K)
    return int(used.any(dim=0).sum()), float(used.sum(dim=1).float().mean())


def _front_matter(model: protoquant.ProtoQuant, metrics: dict, license: str | None) -> str:
    library = model.backbone.info.name.partition("/")[0]
    meta = {"library_name": "protoquant"}
    if license:
        meta["license"] = license
    meta["tags"] = ["protoquant", "image-classification", "interpretability", "prototypes", library]
    meta["pipeline_tag"] = "image-classification"
    if _has_accuracy(metrics):
        meta["metrics"] = ["accuracy"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _dataset(model: protoquant.ProtoQuant, metrics: dict) -> str:
    """The dataset's name as the run recorded it, else as configured."""
    return str(metrics.get("data", {}).get("dataset", model.config.data.dataset))


def _summary(model: protoquant.ProtoQuant, metrics: dict) -> str:
    return (
        f"# ProtoQuant: {_dataset(model, metrics)} on {model.backbone.info.name}\n\n"
        "An interpretable image classifier (quantized prototypical parts on a frozen backbone): "
        "each class logit is a sum over prototypes of presence score x non-negative weight, and "
        "every prototype is a codebook entry learned among real training patch features.\n"
    )


def _facts(model: protoquant.ProtoQuant, metrics: dict) -> str:
    info, head, config = model.backbone.info, model.head, model.config
    data = metrics.get("data", {})
    counts = ", ".join(f"{data[split]} {split}" for split in ("train", "val", "test") if split in data)
    global_size, per_class = explanation_size(model)
    rows = (
        ("data", _dataset(model, metrics) + (f" ({counts} images)" if counts else "")),
        ("classes", str(len(model.classes))),
        ("backbone", f"`{info.name}`, frozen (weights: {info.weights})"),
        ("backbone weights sha256", f"`{info.weights_hash}`"),
        (
            "input",
            f"{config.backbone.image_size} x {config.backbone.image_size} px, "
            f"{info.grid[0]} x {info.grid[1]} grid",
        ),
        (
            "features",
            describe_scale(
                info.grid,
                info.stride,
                info.receptive_field,
                info.image_size,
                pool=config.cache.grid_pool,
                times="x",
            ),
        ),
        ("prototypes (K)", str(head.num_prototypes) + _removed_note(head)),
        ("temperature (tau)", f"{head.temperature:g}"),
        ("explanation size", f"{global_size} prototypes with max_c w[c, k] > {WEIGHT_THRESHOLD:g}"),
        (
            "per-class size",
            f"{per_class:.1f} prototypes per class on average (w[c, k] > {WEIGHT_THRESHOLD:g})",
        ),
    )
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Model\n\n| | |\n|---|---|\n{table}\n"


def _has_accuracy(metrics: dict) -> bool:
    return any("test_accuracy" in metrics.get(stage, {}) for stage, _ in STAGES)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _removed_note(head) -> str:
    """How many removed prototypes still enter the softmax normaliser (a `PrunedHead`), if any."""
    removed = int(getattr(head, "num_removed", 0))
    return f" (+ {removed} removed, kept in the softmax normaliser only)" if removed else ""


def _history(model: protoquant.ProtoQuant) -> str:
    """The edit history section: one row per edit, oldest first."""
    if not model.edits:
        return "## Edit history\n\nNone: the model is as training produced it.\n"
    rows = "\n".join(
        f"| {n} | {r.time} | {r.operation} | {_parameters(r.parameters)} "
        f"| {_percent(r.before.val_accuracy)} -> {_percent(r.after.val_accuracy)} "
        f"| {r.before.global_size} -> {r.after.global_size} "
        f"| {r.before.per_class_size:.1f} -> {r.after.per_class_size:.1f} "
        f"| {r.before.num_prototypes} -> {r.after.num_prototypes} |"
        for n, r in enumerate(model.edits, 1)
    )
    return (
        "## Edit history\n\nEdits made with `protoquant edit` after training (UTC times; accuracy on the "
        f"validation split; sizes count weights > {WEIGHT_THRESHOLD:g}).\n\n"
        "| # | time | operation | parameters | val accuracy | prototypes weighted | per class | K |\n"
        f"|---|---|---|---|---|---|---|---|\n{rows}\n"
    )


def _parameters(parameters: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in parameters.items()) or "-"


def _accuracy(metrics: dict, *, edited: bool = False) -> str:
    if not _has_accuracy(metrics):
        return "## Accuracy\n\nNot recorded (no run `metrics.json` was found beside the checkpoint).\n"
    rows = "\n".join(
        f"| {label} | {_percent(metrics[stage].get('val_accuracy'))} "
        f"| {_percent(metrics[stage].get('test_accuracy'))} |"
        for stage, label in STAGES
        if stage in metrics
    )
    note = " These are the trained model's, before the edits below." if edited else ""
    return (
        "## Accuracy\n\nFrom the training run's `metrics.json`; validation is carved from the training "
        f"data, test is the dataset's test split.{note}\n\n| model | val | test |\n|---|---|---|\n{rows}\n"
    )


def _classes(model: protoquant.ProtoQuant) -> str:
    shown = ", ".join(model.classes[:MAX_LISTED_CLASSES])
    rest = len(model.classes) - MAX_LISTED_CLASSES
    more = f", ... and {rest} more (all in `config.json`)" if rest > 0 else ""
    return f"## Classes\n\n{shown}{more}\n"


def _usage(model: protoquant.ProtoQuant, repo_id: str, with_gallery: bool) -> str:
    info = model.backbone.info
    explain = (
        "model.explain(image)  # prototypes, heatmaps and nearest training patches"
        if with_gallery
        else "model.explain(image, gallery=False)  # prototypes and heatmaps"
    )
    gallery = (
        "The prototype gallery (each prototype's nearest training patches) is included; cropping the "
        "patches' pixels needs the training data named in the config."
        if with_gallery
        else "No prototype gallery is included (`protoquant gallery --model DIR` builds one from the "
        "training data)."
    )
    weights = (
        "The random backbone weights are part of this repo (`backbone.safetensors`)."
        if info.weights == "random"
        else f"The backbone weights are not in this repo: `{info.name}` is resolved locally by name "
        "(timm / torchvision caches, or `--backbone.download true`) and checked against the sha256 above."
    )
    return (
        "## Usage\n\n```python\nfrom PIL import Image\nfrom protoquant import ProtoQuant\n\n"
        f'model = ProtoQuant.from_pretrained("{repo_id}")\n'
        'image = Image.open("image.jpg")\n'
        "prediction = model.predict(image)\n"
        "print(model.classes[int(prediction.classes[0])])\n"
        f"explanation = {explain}\n```\n\n{weights}\n\n{gallery}\n"
    )
