"""A damaged checkpoint given to `predict`, `explain` or `evaluate`.

Right means an error naming the damaged file or field (or, for the damage in `HANDLED_OK`, the
intact answer). Exit 0 counts as handled only when the answer is still the intact checkpoint's: the same `predict --json` document, the same test
accuracy, or a complete report without NaN in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fault_cases.harness import HANDLED, NAMED, Case, Outcome, Workspace, json_problem, judge, strict_json

WEIGHTS, META, BACKBONE = "model.safetensors", "config.json", "backbone.safetensors"


def _tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        tensors = load_file(str(model / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(model / WEIGHTS))

    return apply


def _meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        meta = json.loads((model / META).read_text())
        edit(meta)
        (model / META).write_text(json.dumps(meta))

    return apply


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        path = model / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])

    return apply


def _wider_codebook(tensors: dict) -> None:
    codebook = tensors["codebook"]  # (K, D)
    tensors["codebook"] = np.concatenate([codebook, codebook[:, :1]], axis=1)  # (K, D + 1)


def _nan_row(tensors: dict) -> None:
    tensors["codebook"][0] = np.nan


def _empty(model: Path) -> None:
    for path in model.iterdir():
        path.unlink()


DAMAGE = {
    "truncated-safetensors": (_truncate(WEIGHTS), (WEIGHTS,)),
    "garbage-safetensors": (lambda m: (m / WEIGHTS).write_bytes(bytes(range(256)) * 8), (WEIGHTS,)),
    "config-without-weights-hash": (_meta(lambda m: m["backbone"].pop("weights_hash")), ("weights_hash",)),
    "config-without-temperature": (_meta(lambda m: m.pop("temperature")), ("temperature",)),
    "config-not-json": (lambda m: (m / META).write_text("{'classes': [1, 2"), (META,)),
    "config-format-99": (_meta(lambda m: m.update(format=99)), ("format",)),
    "codebook-wrong-width": (_tensors(_wider_codebook), ("codebook", WEIGHTS)),
    "nan-codebook-row": (_tensors(_nan_row), ("codebook", "nan", WEIGHTS)),
    "wrong-number-of-classes": (_meta(lambda m: m.update(classes=m["classes"][:-1])), ("classes", META)),
    "truncated-backbone": (_truncate(BACKBONE), (BACKBONE,)),
    "deleted-backbone": (lambda m: (m / BACKBONE).unlink(), (BACKBONE, "weights")),
    "empty-folder": (_empty, ("checkpoint", WEIGHTS)),
}
HANDLED_OK = {  # damage that a right answer may survive (checked against the intact checkpoint)
    "config-without-weights-hash",  # the weights can still be checked by rebuilding them
    "deleted-backbone",  # random weights are seeded: rebuilding gives the same backbone
}
COMMANDS = {  # damage -> commands it is tried with
    "truncated-safetensors": ("predict", "explain", "evaluate"),
    "garbage-safetensors": ("predict", "explain"),
    "config-without-weights-hash": ("predict",),
    "config-without-temperature": ("predict",),
    "config-not-json": ("predict", "evaluate"),
    "config-format-99": ("predict",),
    "codebook-wrong-width": ("predict", "evaluate"),
    "nan-codebook-row": ("predict", "explain"),
    "wrong-number-of-classes": ("predict", "evaluate"),
    "truncated-backbone": ("predict",),
    "deleted-backbone": ("predict",),
    "empty-folder": ("predict",),
}


def _args(command: str, ws: Workspace) -> list[str]:
    images = [str(ws.refs.images / f"picture{i}.png") for i in range(2)]
    if command == "predict":
        return ["predict", "--model", "run/model", "--json", *images]
    if command == "explain":
        return ["explain", *images, "--model", "run/model", "--out", "report", "--json"]
    return ["evaluate", "--model", "run/model", "--json"]


def answer_problem(command: str, ws: Workspace, stdout: str) -> str | None:
    """Why a command's exit-0 answer is not the intact checkpoint's, or None."""
    problem = json_problem(stdout)
    if problem or command == "explain":
        return problem or report_problem(ws.dir / "report" / "index.html")
    document = strict_json(stdout)
    if command == "predict":
        same = document.get("predictions") == ws.refs.predictions["predictions"]
        return None if same else "predictions differ from the intact checkpoint's"
    expected = ws.refs.tiny_metrics["protoquant"]["test_accuracy"]
    accuracy = document.get("accuracy")
    return None if accuracy == expected else f"accuracy {accuracy}, intact checkpoint {expected}"


NAN_WORD = re.compile(r"\bnan\b|\binf\b", re.IGNORECASE)


def report_problem(index: Path) -> str | None:
    """Why the HTML report at `index` (and its other pages) is missing, cut short or shows NaN."""
    if not index.is_file():
        return f"no {index.name} written"
    for page in sorted(index.parent.glob("*.html")):
        text = page.read_text(errors="replace")
        if not text.rstrip().endswith("</html>"):
            return f"{page.name} is cut short"
        visible = re.sub(r"<[^>]*>", " ", re.sub(r"data:[^\"')]+", "", text))  # text only, no data URIs
        if NAN_WORD.search(visible):
            return f"{page.name} shows NaN"
    return None


def checkpoint_case(damage: str, command: str) -> Case:
    func, names = DAMAGE[damage]

    def run(ws: Workspace) -> Outcome:
        run_dir = ws.copy_run(ws.refs.tiny)
        func(run_dir / "model")
        proc = ws.cli(_args(command, ws))
        return judge(proc, names=names, check=lambda: answer_problem(command, ws, proc.stdout))

    accept = (NAMED, HANDLED) if damage in HANDLED_OK else (NAMED,)
    return Case(f"ckpt-{damage}-{command}", "corrupt checkpoint", run, accept=accept)


def cases(refs) -> list[Case]:
    return [checkpoint_case(damage, command) for damage, commands in COMMANDS.items() for command in commands]
