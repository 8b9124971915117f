"""Numbers and names as the report and the figures print them.

A probability or share that is not a finite number reads "n/a" (never "nan %"); a name taken
from the file system is shown as text (`display_name`: undecodable bytes as escapes), so every
page and figure can be encoded, whatever the folders are called.
"""

from __future__ import annotations

import math

from protoquant.data.base import display_name

NOT_AVAILABLE = "n/a"  # what a non-finite number is shown as


def finite(value: float | None) -> bool:
    """Whether `value` is a real, finite number (None, NaN and infinities are not)."""
    return value is not None and math.isfinite(float(value))


def percent(fraction: float | None, digits: int = 1) -> str:
    """0.1234 -> "12.3 %"; a non-finite or missing fraction -> "n/a"."""
    return f"{100 * float(fraction):.{digits}f} %" if finite(fraction) else NOT_AVAILABLE


def number(value: float | None, digits: int = 2) -> str:
    """1.234 -> "1.23"; a non-finite or missing value -> "n/a"."""
    return f"{float(value):.{digits}f}" if finite(value) else NOT_AVAILABLE


def shown_name(name: str) -> str:
    """A class, file or image name as printable text (see the module docstring)."""
    return display_name(str(name))
