"""Reading a checkpoint's files strictly: every problem is a `CheckpointError` naming file and field.

`read_meta` checks `config.json` (valid JSON, a readable format, the fields loading needs, of the
right types); `read_tensors` reads a safetensors file and refuses NaN / infinite values;
`check_shapes` compares the stored tensors with the ones a freshly built module expects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from protoquant.errors import CheckpointError

CONFIG_FILE = "config.json"
HEAD_FILE = "model.safetensors"


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """The folder does not exist or lacks a checkpoint file (also a FileNotFoundError)."""


def _field(meta: dict, dotted: str, where: Path) -> object:
    """`meta["a"]["b"]` for 'a.b', or a CheckpointError naming file `where` and the missing field."""
    node: object = meta
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"{where}: no field '{dotted}'")
        node = node[key]
    return node


def _check_fields(meta: dict, where: Path) -> None:
    """The fields `ProtoQuant.load` reads, each of its type (CheckpointError naming the first bad one)."""
    for name, what in (("config", "the run config"), ("backbone", "the backbone facts")):
        if not isinstance(_field(meta, name, where), dict):
            raise CheckpointError(f"{where}: field '{name}' must be a mapping ({what})")
    weights_hash = _field(meta, "backbone.weights_hash", where)
    if not isinstance(weights_hash, str) or not weights_hash:
        raise CheckpointError(f"{where}: field 'backbone.weights_hash' must be a non-empty string")
    classes = _field(meta, "classes", where)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{where}: field 'classes' must be a non-empty list of class names")
    temperature = _field(meta, "temperature", where)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise CheckpointError(f"{where}: field 'temperature' must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{where}: field 'temperature' must be finite and > 0, got {temperature}")


def read_meta(path: Path, readable_formats: tuple[int, ...]) -> dict:
    """The checkpoint folder's `config.json`, checked.

    Raises:
        NotACheckpointError: the folder lacks config.json or model.safetensors.
        CheckpointError: config.json is not JSON, has another format or lacks / mistypes a field
            (the message names the file and the field).
    """
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or not (path / HEAD_FILE).is_file():
        raise NotACheckpointError(
            f"{path} is not a protoquant checkpoint (needs {CONFIG_FILE} and {HEAD_FILE})"
        )
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: not a readable JSON file ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") not in readable_formats:
        readable = " and ".join(str(f) for f in readable_formats)
        raise CheckpointError(
            f"{config_path}: checkpoint format {meta.get('format')!r}, this version reads {readable}"
        )
    _check_fields(meta, config_path)
    return meta


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, all finite.

    Raises:
        CheckpointError: the file is truncated, not safetensors, or a tensor holds NaN / inf
            (the message names the file and the tensor).
    """
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{file}: tensor '{name}' has {bad} NaN or infinite value(s)")
    return tensors


def check_shapes(
    file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str
) -> None:
    """The stored tensors are exactly the expected ones (names and shapes).

    Raises:
        CheckpointError: a tensor is missing, unexpected or of another shape; the message names the
            file, the tensor and `what` the shape follows from.
    """
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{file}: tensors missing {missing}, unexpected {extra} for {what}")
    for name, reference in expected.items():
        if tuple(tensors[name].shape) != tuple(reference.shape):
            raise CheckpointError(
                f"{file}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected "
                f"{tuple(reference.shape)} ({what})"
            )
