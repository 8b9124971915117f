"""The output of one metric runner, and conversion of results to plain JSON values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class MetricResult:
    """What a runner returns: the value for the report, its protocol record, optional rows."""

    value: Any  # a float, or a dict of JSON-ready summary numbers
    protocol: dict  # settings, rules and deviations this metric used
    rows: tuple[dict, ...] = ()  # per-image / per-prototype records (written as CSV, not JSON)


def jsonable(value: Any) -> Any:
    """Dataclasses, numpy and torch values -> plain JSON types (NaN -> None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    return value
