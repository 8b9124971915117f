"""SIGKILL during a run, then the same command again.

Ten kill moments are fractions of the reference run's wall time W (the detail column says
which), spread over the phases its stderr showed (caching, stage 0, stage 1, stage 2, after the
last stage) and timed from the start of their phase in the live run; two more come from the file system: the checkpoint's temporary folder appearing,
and the run's last output file appearing (the final write and the swap into `--out`). Half of
the cases start with a previous complete run (seed 1) in the same `--out`.

Right means: right after the kill, the outputs are all absent, all from the previous run or all
from the new one (never mixed or half-written), a previous checkpoint still loads; the rerun
exits 0 with the reference's metrics, and no `.*.tmp-*` leftovers remain anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from fault_cases.harness import (
    REPAIRED,
    Case,
    Outcome,
    Workspace,
    first_problem,
    judge,
    leftovers,
    metrics_problem,
    unloadable,
)
from fault_cases.references import KILL, run_timed

OUTPUTS = ("model", "metrics.json", "config.yaml", "history.jsonl")
PHASES = (("caching", "caching"), ("stage 0", "stage 0"), ("k-means", "stage 1"), ("stage 2", "stage 2"))
TIMED = (("caching", 0.15), ("caching", 0.5), ("caching", 0.85), ("stage 0", 0.3), ("stage 0", 0.7))
TIMED += (("stage 1", 0.5), ("stage 2", 0.2), ("stage 2", 0.5), ("stage 2", 0.8), ("after stages", 0.3))


def phase_starts(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds at which each phase's first stderr line came, in phase order.

    Score passes after stage 2 (evaluation, summaries) begin 'after stages'.
    """
    starts: dict[str, float] = {}
    for seconds, line in lines:
        phase = next((name for prefix, name in PHASES if line.startswith(prefix)), None)
        if "stage 2" in starts and line.startswith("prototype scores"):
            phase = "after stages"
        if phase:
            starts.setdefault(phase, seconds)
    return starts


def phase_windows(timeline: list[tuple[float, str]], wall: float) -> dict[str, tuple[float, float]]:
    """Each phase's (start, end) seconds in the reference run."""
    starts = phase_starts(timeline)
    names = list(starts)
    ends = [starts[n] for n in names[1:]] + [wall]
    return {name: (starts[name], end) for name, end in zip(names, ends)}


def phase_of(lines: list[tuple[float, str]]) -> str:
    """The phase the run was in when the last of `lines` came ('start-up' before any)."""
    starts = phase_starts(lines)
    return list(starts)[-1] if starts else "start-up"


def _identity(run: Path, refs) -> str:
    """'seed 0' / 'seed 1' when config.yaml, the checkpoint and the metrics agree, else why not."""
    try:
        seeds = {
            yaml.safe_load((run / "config.yaml").read_text())["seed"],
            json.loads((run / "model" / "config.json").read_text())["config"]["seed"],
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable outputs: {type(err).__name__}"
    reference = {0: refs.metrics("kill0"), 1: refs.metrics("kill1")}
    if len(seeds) != 1 or (seed := seeds.pop()) not in reference:
        return "config.yaml and the checkpoint come from different runs"
    if metrics_problem(run / "metrics.json", reference[seed]):
        return f"metrics.json is not the seed-{seed} run's"
    return f"seed {seed}"


def after_kill(run: Path, refs, previous: bool) -> tuple[str | None, str | None]:
    """(why a previous run is lost, why the outputs are mixed or half-written), each None if fine."""
    present = [name for name in OUTPUTS if (run / name).exists()]
    if not present:
        return ("the previous run's outputs are gone" if previous else None), None
    lost = unloadable(run / "model") if previous else None
    if len(present) < len(OUTPUTS):
        return lost, f"after the kill only {', '.join(present)} exist"
    identity = _identity(run, refs)
    return lost, (None if identity.startswith("seed") else f"after the kill: {identity}")


def _rerun_problem(ws: Workspace, mixed: str | None) -> Callable[[], str | None]:
    run = ws.dir / "run"

    def config_seed() -> str | None:
        seed = yaml.safe_load((run / "config.yaml").read_text()).get("seed")
        return None if seed == 0 else f"config.yaml has seed {seed} after the rerun"

    def no_leftovers() -> str | None:
        left = leftovers(ws.dir)
        return f"leftovers after the rerun: {', '.join(left[:3])}" if left else None

    return lambda: first_problem(
        lambda: mixed,
        lambda: metrics_problem(run / "metrics.json", ws.refs.metrics("kill0")),
        config_seed,
        lambda: unloadable(run / "model"),
        no_leftovers,
    )


def kill_case(name: str, moment, previous: bool) -> Case:
    """`moment(refs)` -> (kill_when for `run_timed`, what the moment is, for the detail column)."""

    def run(ws: Workspace) -> Outcome:
        kill_when, planned = moment(ws.refs)
        if previous:
            ws.copy_run(ws.refs.kill1)
        timed = run_timed(ws, KILL, kill_when=kill_when)
        if timed.proc.rc is not None:  # the moment never came: the run finished or failed first
            return judge(timed.proc, check=lambda: "the kill moment never came", success=REPAIRED)
        lost, mixed = after_kill(ws.dir / "run", ws.refs, previous)
        rerun = ws.cli(KILL)
        outcome = judge(rerun, check=_rerun_problem(ws, mixed), success=REPAIRED, lost=lambda: lost)
        killed = f"{planned}: killed at {timed.proc.seconds:.1f} s ({phase_of(timed.lines)})"
        return Outcome(outcome.outcome, outcome.message, f"{killed}; {outcome.detail}".strip("; "))

    return Case(name, "sigkill", run, accept=(REPAIRED,))


def _timed(phase: str, share: float):
    """`share` of the way through `phase`, timed from the moment the live run enters it with the
    reference run's phase length (so start-up and the earlier phases, which vary with the load of
    the machine, do not move the moment to another phase); labelled as a fraction of W."""

    def moment(refs):
        start, end = phase_windows(refs.timeline, refs.wall).get(phase, (0.0, refs.wall))
        into = share * (end - start)

        def kill_when(ws, elapsed, lines) -> bool:
            began = phase_starts(lines).get(phase)
            return began is not None and elapsed >= began + into

        return kill_when, f"{(start + into) / refs.wall:.2f} W"

    return moment


MODEL_WRITE = (".run.tmp-*/.model.tmp-*", ".run.tmp-*/model", "run/.model.tmp-*")  # checkpoint being written
RUN_SWAP = (".run.tmp-*/metrics.json", ".run.old-*", "run/.metrics.json.tmp-*")  # last files, swap


def _appears(patterns: tuple[str, ...], what: str):
    """The moment a file matching one of `patterns` (below the case folder) exists."""

    def moment(refs):
        return (lambda ws, elapsed, lines: any(any(ws.dir.glob(p)) for p in patterns)), what

    return moment


def cases(refs) -> list[Case]:
    out = []
    for index, (phase, share) in enumerate(TIMED):
        previous = index % 2 == 1
        label = f"kill-{phase.replace(' ', '')}-{share:.2f}" + ("-over-previous" if previous else "")
        out.append(kill_case(label, _timed(phase, share), previous))
    for name, moment in (
        ("kill-checkpoint-write", _appears(MODEL_WRITE, "checkpoint temp folder seen")),
        ("kill-run-swap", _appears(RUN_SWAP, "last output file seen")),
    ):
        out += [kill_case(name, moment, False), kill_case(f"{name}-over-previous", moment, True)]
    return out
