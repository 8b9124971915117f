"""The edit history a checkpoint carries: one `EditRecord` per `protoquant edit` operation.

It lives in the checkpoint's `config.json` under "edits" (oldest first) and travels with every
save, so a model that was limited, pruned or re-fitted says so wherever it goes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

MEASURES = ("val_accuracy", "global_size", "per_class_size", "num_prototypes")  # before / after keys
FIELDS = ("operation", "parameters", "time", "before", "after", "details")


@dataclass(frozen=True)
class ModelState:
    """What an edit is judged by, measured on the validation split."""

    val_accuracy: float
    global_size: int  # prototypes with max_c w[c, k] > WEIGHT_THRESHOLD
    per_class_size: float  # mean over classes of #{k : w[c, k] > WEIGHT_THRESHOLD}
    num_prototypes: int  # K of the head (explained prototypes)


@dataclass(frozen=True)
class EditRecord:
    """One edit: what was done, with which parameters, when, and the model before and after."""

    operation: str  # e.g. "top_k", "remove_unused", "disable", "merge", "refit"
    parameters: dict
    time: str  # UTC, ISO 8601
    before: ModelState
    after: ModelState
    details: dict = field(default_factory=dict)  # operation-specific facts (kept ids, merged groups)

    def to_dict(self) -> dict:
        """Plain JSON types, as stored in config.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "edit record") -> EditRecord:
        """Read a stored record; `where` names it in errors (e.g. 'config.json: edits[2]')."""
        missing = [name for name in FIELDS[:5] if name not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; expected {', '.join(FIELDS)}")
        states = {}
        for name in ("before", "after"):
            absent = [key for key in MEASURES if key not in data[name]]
            if absent:
                raise ValueError(f"{where}: '{name}' lacks {', '.join(absent)}")
            states[name] = ModelState(**{key: data[name][key] for key in MEASURES})
        return cls(
            str(data["operation"]),
            dict(data["parameters"]),
            str(data["time"]),
            states["before"],
            states["after"],
            dict(data.get("details", {})),
        )


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (e.g. 2026-01-31T12:00:00+00:00)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_history(items: list, where: str) -> tuple[EditRecord, ...]:
    """The records stored under "edits" (a list), each checked; `where` names the file."""
    if not isinstance(items, list):
        raise ValueError(f"{where}: 'edits' must be a list of edit records, got {type(items).__name__}")
    return tuple(EditRecord.from_dict(item, f"{where}: edits[{i}]") for i, item in enumerate(items))


def format_history(history: tuple[EditRecord, ...]) -> str:
    """The history as text, one block per edit (oldest first)."""
    if not history:
        return "No edits: the model is as training produced it."
    lines = []
    for number, record in enumerate(history, 1):
        parameters = ", ".join(f"{key}={value}" for key, value in record.parameters.items())
        lines.append(f"{number}. {record.operation}({parameters}) at {record.time}")
        for label, state in (("before", record.before), ("after", record.after)):
            lines.append(
                f"   {label:<6} val accuracy {100 * state.val_accuracy:.1f} %, {state.global_size} "
                f"prototypes weighted of K={state.num_prototypes}, {state.per_class_size:.1f} per class"
            )
        lines += [f"   {line}" for line in _detail_lines(record.details)]
    return "\n".join(lines)


def _detail_lines(details: dict) -> list[str]:
    """The operation-specific facts worth a line of text (all of them are in the JSON)."""
    lines = []
    if "val_max_logit_change" in details:
        lines.append(
            f"val logits moved by at most {details['val_max_logit_change']:.3g}; predictions agree on "
            f"{100 * details.get('val_prediction_agreement', float('nan')):.1f} % of validation images"
        )
    if "removed" in details:
        lines.append(
            f"removed {details['removed']} prototypes; kept ones renumbered 0..{len(details['kept']) - 1}"
        )
    if details.get("groups"):
        groups = "; ".join(" + ".join(str(k) for k in group) for group in details["groups"])
        lines.append(f"merged (first one kept): {groups}")
    return lines
