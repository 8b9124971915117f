"""Config fields that carry their help text and the values they accept.

`knob(default, help, choices=..., minimum=..., maximum=..., above=...)` declares a field; a config
section built on `Checked` refuses a value outside them when it is constructed, naming the field.
The command line reads the same metadata for its help text and choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def knob(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """A config field with its help text and the values it accepts (checked by `Checked`).

    `minimum`/`maximum` are inclusive bounds, `above` an exclusive lower bound; for tuple fields
    they apply to every item. The stored help ends with what the field accepts ("(>= 1)",
    "(comma list, each > 0)"), so `--help` shows the bounds; choices are stored as they are.
    """
    accepts = _accepts(isinstance(default, tuple), minimum, maximum, above)
    meta = {
        "help": f"{help} ({accepts})" if accepts else help,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
    }
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def _accepts(is_tuple: bool, minimum: float | None, maximum: float | None, above: float | None) -> str:
    """A field's bounds in words: '>= 1', 'in (0, 1]', 'comma list, each > 0', or ''."""
    low, low_text = (above, "(") if above is not None else (minimum, "[")
    if low is not None and maximum is not None:
        bounds = f"in {low_text}{low:g}, {maximum:g}]"
    elif low is not None:
        bounds = f"{'>' if above is not None else '>='} {low:g}"
    else:
        bounds = f"<= {maximum:g}" if maximum is not None else ""
    if not is_tuple:
        return bounds
    return f"comma list, each {bounds}" if bounds else "comma list"


def _problem(value: Any, meta: dict) -> str | None:
    """Why `value` breaks the field's declared choices or bounds, or None."""
    for item in value if isinstance(value, tuple) else (value,):
        if meta.get("choices") and item not in meta["choices"]:
            return f"must be one of {', '.join(map(repr, meta['choices']))}, got {item!r}"
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        if item != item:  # NaN
            return "must be a number, got nan"
        if meta.get("minimum") is not None and item < meta["minimum"]:
            return f"must be >= {meta['minimum']:g}, got {item!r}"
        if meta.get("maximum") is not None and item > meta["maximum"]:
            return f"must be <= {meta['maximum']:g}, got {item!r}"
        if meta.get("above") is not None and item <= meta["above"]:
            return f"must be > {meta['above']:g}, got {item!r}"
    return None


class Checked:
    """Mixin: a config section checks every field's choices and bounds when it is built."""

    section = ""  # dotted prefix in error messages ("codebook.")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            problem = _problem(getattr(self, f.name), f.metadata)
            if problem:
                raise ValueError(f"config field '{self.section}{f.name}' {problem}")
