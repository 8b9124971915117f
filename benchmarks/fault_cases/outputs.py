"""Concurrent runs, the `--json` documents of every command, and the `python -m protoquant` entry.

Two `train` processes on one fresh cache must both succeed with the reference's metrics while
the backbone computes each shard once (the `written-rank*.jsonl` audit logs name one writer per
shard). Two on one `--out` must leave one complete, loadable run. Every `--json` document must
be strict JSON (no NaN / Infinity) with the fields the command documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fault_cases.checkpoints import report_problem
from fault_cases.harness import (
    HANDLED,
    Case,
    Outcome,
    Proc,
    Workspace,
    child_env,
    first_problem,
    json_problem,
    judge,
    leftovers,
    metrics_problem,
    strict_json,
    unloadable,
)
from fault_cases.references import TINY


def _together(ws: Workspace, commands: list[list[str]]) -> list[Proc]:
    """Run every command at once (each read by its own thread) and wait for all of them."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(ws.cli, commands))


def shards_written_once(cache_root: Path) -> str | None:
    """Why some shard of a cache below `cache_root` was written twice or never, or None."""
    for folder in sorted(p for p in cache_root.iterdir() if p.is_dir()):
        records = [
            json.loads(line)
            for log in folder.glob("written-rank*.jsonl")
            for line in log.read_text().splitlines()
        ]
        counts = Counter(record["shard"] for record in records)
        manifest = json.loads((folder / "manifest.json").read_text())
        expected = -(-manifest["num_entries"] // manifest["shard_size"])
        twice = sorted(shard for shard, count in counts.items() if count > 1)
        if twice:
            return f"{folder.name[:20]}: shard {twice[0]} computed {counts[twice[0]]} times ({len(twice)} shards twice)"
        if len(counts) != expected:
            return f"{folder.name[:20]}: {len(counts)} of {expected} shards in the audit log"
    return None


def _worst(outcomes: list[Outcome]) -> Outcome:
    return next((o for o in outcomes if o.outcome != HANDLED), outcomes[-1])


def _same_cache_case() -> Case:
    def run(ws: Workspace) -> Outcome:
        flags = TINY[3:]
        commands = [["train", "--out", out, *flags, "--cache.root", "shared"] for out in ("a", "b")]
        procs = _together(ws, commands)

        def check() -> str | None:
            return first_problem(
                *(
                    lambda o=o: metrics_problem(ws.dir / o / "metrics.json", ws.refs.tiny_metrics)
                    for o in "ab"
                ),
                lambda: shards_written_once(ws.dir / "shared"),
                lambda: f"leftovers: {leftovers(ws.dir)[:3]}" if leftovers(ws.dir) else None,
            )

        return _worst([judge(procs[0]), judge(procs[1], check=check)])

    return Case("concurrent-train-same-cache", "concurrent", run, accept=(HANDLED,))


def _same_out_case() -> Case:
    def run(ws: Workspace) -> Outcome:
        procs = _together(ws, [TINY, TINY])

        def check() -> str | None:
            return first_problem(
                lambda: metrics_problem(ws.dir / "run" / "metrics.json", ws.refs.tiny_metrics),
                lambda: unloadable(ws.dir / "run" / "model"),
                lambda: f"leftovers: {leftovers(ws.dir)[:3]}" if leftovers(ws.dir) else None,
            )

        return _worst([judge(procs[0]), judge(procs[1], check=check)])

    return Case("concurrent-train-same-out", "concurrent", run, accept=(HANDLED,))


def _json_case(name: str, args_of, keys: tuple[str, ...], extra_check=None) -> Case:
    def run(ws: Workspace) -> Outcome:
        ws.copy_run(ws.refs.tiny)
        proc = ws.cli(args_of(ws))

        def check() -> str | None:
            problem = json_problem(proc.stdout, keys)
            return problem or (extra_check(ws, strict_json(proc.stdout)) if extra_check else None)

        return judge(proc, check=check)

    return Case(f"json-{name}", "json output", run, accept=(HANDLED,))


def _images(ws: Workspace) -> list[str]:
    return [str(ws.refs.images / f"picture{i}.png") for i in range(2)]


def _entry_case() -> Case:
    """`python -m protoquant --version` itself (the matrix falls back to protoquant.cli without it)."""

    def run(ws: Workspace) -> Outcome:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "protoquant", "--version"], cwd=ws.dir, env=child_env(ws.dir),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        proc = Proc(["--version"], done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
        return judge(
            proc, check=lambda: None if done.stdout.startswith("protoquant ") else "no version printed"
        )

    return Case("entry-python-m-protoquant", "entry point", run, accept=(HANDLED,))


def cases(refs) -> list[Case]:
    model = ["--model", "run/model"]
    return [
        _same_cache_case(),
        _same_out_case(),
        _json_case(
            "train", lambda ws: [*TINY, "--json"], ("checkpoint", "metrics"),
            lambda ws, doc: metrics_problem(ws.dir / "run" / "metrics.json", ws.refs.tiny_metrics),
        ),
        _json_case(
            "predict", lambda ws: ["predict", *model, "--json", *_images(ws)], ("predictions",),
            lambda ws, doc: None if doc["predictions"] == ws.refs.predictions["predictions"] else "predictions differ",
        ),
        _json_case(
            "explain", lambda ws: ["explain", *_images(ws), *model, "--out", "report", "--json"], ("report",),
            lambda ws, doc: report_problem(Path(doc["report"])),
        ),
        _json_case("evaluate", lambda ws: ["evaluate", *model, "--json"], ("accuracy",)),
        _json_case("audit", lambda ws: ["audit", *model, "--no_noise", "--json"], ()),
        _json_case("gallery", lambda ws: ["gallery", *model, "--json"], ("gallery", "num_prototypes")),
        _json_case("data-check", lambda ws: ["data", "check", "--dataset", "synthetic", "--json"], ("problems",)),
        _entry_case(),
    ]  # fmt: skip
