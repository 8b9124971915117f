"""Config <-> plain dicts and YAML, dotted field names, overrides, and renamed fields."""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any

import yaml

from protoquant.config.sections import RunConfig
from protoquant.errors import ConfigError
from protoquant.knobs import coerce

logger = logging.getLogger(__name__)


# Fields renamed since checkpoints were first written: old dotted name -> new dotted name.
RENAMED_FIELDS = {
    "codebook.num_codes": "codebook.num_prototypes",
    "codebook.reset_dead_codes": "codebook.reset_dead_prototypes",
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict (YAML, JSON), values coerced to the field types.

    Raises:
        ConfigError: a section is not a mapping, a field is unknown, or a value cannot be read or
            is outside its choices / bounds (the message names the dotted field).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or cls.__name__}' must be a mapping, got {data!r}")
    if cls is RunConfig:
        data = upgrade(data)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in names)
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(where + k for k in unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = coerce(value, hint, where + name)
    return cls(**kwargs)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict with fields renamed since it was written (`RENAMED_FIELDS`) moved to their new names."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED_FIELDS.items():
        (section, old_name), (_, new_name) = old.split("."), new.split(".")
        node = data.get(section)
        if isinstance(node, dict) and old_name in node:
            if new_name in node:
                raise ConfigError(f"config has both '{old}' and its new name '{new}'; keep '{new}'")
            logger.warning("config field '%s' is now '%s'", old, new)
            node[new_name] = node.pop(old_name)
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-dict form (tuples become lists) suitable for JSON and YAML."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def load_yaml(path: str | Path) -> RunConfig:
    """Read a RunConfig from a YAML file (missing sections keep their defaults).

    Raises:
        ConfigError: the file cannot be read, is not YAML, or has a bad field (names file and field).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {' '.join(str(err).split())}") from err
    try:
        return from_dict(RunConfig, {} if data is None else data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def save_yaml(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def flat_fields(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Map 'section.field' -> type annotation for every leaf field (used to build CLI flags)."""
    out: dict[str, Any] = {}
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(flat_fields(hint, f"{prefix}{name}."))
        else:
            out[prefix + name] = hint
    return out


def leaf_fields(cls: type = RunConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Map 'section.field' -> the dataclass field of every leaf (its metadata: help, choices, bounds)."""
    hints = _hints(cls)
    out: dict[str, dataclasses.Field] = {}
    for spec in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[spec.name]):
            out.update(leaf_fields(hints[spec.name], f"{prefix}{spec.name}."))
        else:
            out[prefix + spec.name] = spec
    return out


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply {'section.field': value} overrides (values coerced to the field type).

    Raises:
        ConfigError: an unknown field, or a value that cannot be read or is out of bounds.
    """
    data = to_dict(config)
    for dotted, value in overrides.items():
        *sections, leaf = dotted.split(".")
        node = data
        for section in sections:
            if section not in node or not isinstance(node[section], dict):
                raise ConfigError(f"unknown config section in '{dotted}'")
            node = node[section]
        if leaf not in node:
            raise ConfigError(f"unknown config field '{dotted}'")
        node[leaf] = value
    return from_dict(RunConfig, data)
