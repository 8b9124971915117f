"""Fault and bad-input matrix: the command line against kills, damaged files and bad input.

Builds reference runs once (`fault_cases.references`), then runs every case in a fresh folder
against `python -m protoquant ...` subprocesses (offline, one thread) and classifies each
outcome automatically (`fault_cases.harness`): repaired / handled, named error, unclear error,
traceback, silent wrong, data lost (and hang). A case lists the outcomes that are right for it;
the `ok` column says whether it got one. Prints a markdown table and a count per outcome.

    python benchmarks/fault_matrix.py [--json fault_matrix.json] [--only SUBSTRING] [--jobs N]
        [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fault_cases import all_cases
from fault_cases.harness import OUTCOMES, Case, Workspace, entry_module
from fault_cases.references import References

HARNESS_ERROR = "harness error"  # the case's own code failed: not a product outcome
MESSAGE_WIDTH = 110  # characters of the message shown in the table


def run_case(case: Case, refs, work: Path, keep: bool) -> dict:
    """Run one case in its own folder; the row of the table (with seconds and whether it is ok)."""
    folder = work / "cases" / case.name
    folder.mkdir(parents=True)
    start = time.perf_counter()
    try:
        result = case.run(Workspace(folder, refs))
        outcome, message, detail = result.outcome, result.message, result.detail
    except Exception as err:  # noqa: BLE001 - one broken case must not stop the matrix
        outcome, message, detail = (
            HARNESS_ERROR,
            f"{type(err).__name__}: {err}",
            traceback.format_exc(limit=3),
        )
    seconds = time.perf_counter() - start
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    row = {"case": case.name, "kind": case.kind, "outcome": outcome, "ok": outcome in case.accept}
    return {
        **row,
        "accept": list(case.accept),
        "message": message,
        "detail": detail,
        "seconds": round(seconds, 2),
    }


def _cell(text: str) -> str:
    line = (text.splitlines() or [""])[0]
    line = line if len(line) <= MESSAGE_WIDTH else line[: MESSAGE_WIDTH - 3] + "..."
    return line.replace("|", "\\|")


def table(rows: list[dict]) -> str:
    lines = ["| case | kind | outcome | ok | message |", "|---|---|---|---|---|"]
    for row in rows:
        ok = "yes" if row["ok"] else "**no**"
        lines.append(f"| {row['case']} | {row['kind']} | {row['outcome']} | {ok} | {_cell(row['message'])} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    counts = Counter(row["outcome"] for row in rows)
    order = [*OUTCOMES, HARNESS_ERROR]
    return {
        "outcomes": {name: counts[name] for name in order if counts[name]},
        "ok": sum(row["ok"] for row in rows),
        "cases": len(rows),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the table and summary here")
    parser.add_argument("--only", metavar="SUBSTRING", help="run the cases whose name or kind contains this")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="cases run at once")
    parser.add_argument("--work", metavar="DIR", help="working folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep every case's folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the harness loads checkpoints to check them; the cores are for the cases
    work = Path(args.work or tempfile.mkdtemp(prefix="fault-matrix-"))
    start = time.perf_counter()
    refs = References(work / "refs")
    cases = [c for c in all_cases(refs) if not args.only or args.only in c.name or args.only in c.kind]
    print(f"{len(cases)} cases, python -m {entry_module()}, {args.jobs} at once", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda case: run_case(case, refs, work, args.keep), cases))
    counts = summary(rows)
    total = time.perf_counter() - start
    print(table(rows))
    print("\n" + ", ".join(f"{name}: {count}" for name, count in counts["outcomes"].items()))
    print(f"ok: {counts['ok']} of {counts['cases']} cases; {total:.0f} s in all, references included")
    if args.json:
        document = {
            "command": " ".join(["python", "benchmarks/fault_matrix.py", *(argv or sys.argv[1:])]),
            "entry": f"python -m {entry_module()}",
            "machine": f"{platform.platform()}, python {platform.python_version()}",
            "seconds": round(total, 1),
            "summary": counts,
            "cases": rows,
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
