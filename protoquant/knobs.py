"""Config fields that carry their help text and the values they accept.

`knob(default, help, minimum=..., maximum=..., above=...)` declares a field; its choices are its
`typing.Literal[...]` type. A config section built on `Checked` refuses a value outside them (or a
NaN / infinite number) when it is constructed, raising a `ConfigError` that names the field. The
command line reads the same metadata and types for its help text and choices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import field
from typing import Any

from protoquant.errors import ConfigError


def knob(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """A config field with its help text and the values it accepts (checked by `Checked`).

    `minimum`/`maximum` are inclusive bounds, `above` an exclusive lower bound; for tuple fields
    they apply to every item. The stored help ends with what the field accepts ("(>= 1)",
    "(comma list, each > 0)"), so `--help` shows the bounds.
    """
    accepts = _accepts(isinstance(default, tuple), minimum, maximum, above)
    meta = {
        "help": f"{help} ({accepts})" if accepts else help,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
    }
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _accepts(is_tuple: bool, minimum: float | None, maximum: float | None, above: float | None) -> str:
    """A field's bounds in words: '>= 1', 'in (0, 1]', 'comma list, each > 0', or ''."""
    low, low_text = (above, "(") if above is not None else (minimum, "[")
    if low is not None and maximum is not None:
        bounds = f"in {low_text}{_number(low)}, {_number(maximum)}]"
    elif low is not None:
        bounds = f"{'>' if above is not None else '>='} {_number(low)}"
    else:
        bounds = f"<= {_number(maximum)}" if maximum is not None else ""
    if not is_tuple:
        return bounds
    return f"comma list, each {bounds}" if bounds else "comma list"


def choices_of(annotation: Any) -> tuple | None:
    """The values a `Literal[...]` (or `tuple[Literal[...], ...]`) annotation allows, else None."""
    if typing.get_origin(annotation) is tuple:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return None


@functools.cache
def field_choices(cls: type) -> dict[str, tuple]:
    """Field name -> allowed values, for every `Literal`-typed field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {name: choices for name, hint in hints.items() if (choices := choices_of(hint))}


def _problem(value: Any, meta: dict, choices: tuple | None) -> str | None:
    """Why `value` breaks the field's choices or bounds (or is not finite), or None."""
    for item in value if isinstance(value, tuple) else (value,):
        if choices and item not in choices:
            return f"must be one of {', '.join(map(repr, choices))}, got {item!r}"
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            return f"must be a finite number, got {item!r}"
        if meta.get("minimum") is not None and item < meta["minimum"]:
            return f"must be >= {_number(meta['minimum'])}, got {item!r}"
        if meta.get("maximum") is not None and item > meta["maximum"]:
            return f"must be <= {_number(meta['maximum'])}, got {item!r}"
        if meta.get("above") is not None and item <= meta["above"]:
            return f"must be > {_number(meta['above'])}, got {item!r}"
    return None


class Checked:
    """Mixin: a config section checks every field's choices and bounds when it is built.

    Raises:
        ConfigError: a field is outside its choices or bounds, or not finite (the message names it).
    """

    section = ""  # dotted prefix in error messages ("codebook.")

    def __post_init__(self) -> None:
        choices = field_choices(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            problem = _problem(getattr(self, f.name), f.metadata, choices.get(f.name))
            if problem:
                raise ConfigError(f"config field '{self.section}{f.name}' {problem}")


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # booleans as text


def type_name(annotation: Any) -> str:
    """How a field's type reads in an error message: 'int', 'one of ...', 'comma list of float'."""
    if typing.get_origin(annotation) is tuple:
        return f"comma list of {type_name(typing.get_args(annotation)[0])}"
    choices = choices_of(annotation)
    if choices:
        return f"one of {', '.join(map(repr, choices))}"
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """A YAML / CLI value converted to the field's declared type.

    Text is parsed ('256' -> 256, 'true' -> True, '0.05,0.1' -> (0.05, 0.1)); a bool is never read
    as a number, a fractional number never as an int, and null never as anything.

    Raises:
        ConfigError: the value cannot be read as the type (the message names field `where`).
        TypeError: the annotation is not a config field type (a bug in the dataclass).
    """
    try:
        converted = _convert(value, annotation, where)
    except (TypeError, ValueError, OverflowError) as err:
        if isinstance(err, ConfigError):
            raise
        expected = type_name(annotation)
        raise ConfigError(f"config field '{where}': cannot read {value!r} as {expected}") from err
    if converted is _UNSUPPORTED:
        raise TypeError(f"config field '{where}': unsupported type {annotation}")
    return converted


_UNSUPPORTED = object()  # what _convert returns for a type it does not know


def _convert(value: Any, annotation: Any, where: str) -> Any:
    if value is None:
        raise ValueError("null")
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        return tuple(coerce(v, typing.get_args(annotation)[0], where) for v in value)
    choices = choices_of(annotation)
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(value)
        return value
    if annotation is bool:
        return _boolean(value)
    if annotation in (int, float, str):
        return _scalar(value, annotation)
    return _UNSUPPORTED


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(value)


def _scalar(value: Any, annotation: type) -> int | float | str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    if annotation is str:
        return str(value)
    if annotation is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return annotation(value.strip() if isinstance(value, str) else value)
