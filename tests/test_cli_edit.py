"""`protoquant edit` and `protoquant info` end to end on the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protoquant.cli import main
from protoquant.model import ProtoQuant


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Path:
    return Path(tiny_run.config.out) / "model"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_edit_then_info_in_json(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "edited"
    args = ("edit", "--model", str(checkpoint), "--out", str(out), "--disable", "3:1", "--top_k", "2")
    code, stdout, _ = _run(capsys, *args, "--remove_unused", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert [e["operation"] for e in report["edits"]] == ["disable", "top_k", "remove_unused"]
    assert report["edits"][0]["parameters"] == {
        "prototype": 3,
        "class": ProtoQuant.load(checkpoint).classes[1],
    }
    assert report["gallery"] == "none" and report["out"] == str(out)
    code, stdout, _ = _run(capsys, "info", "--model", str(out), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["edits"] == report["edits"] and info["format"] == 2
    assert (
        info["num_prototypes"] + info["num_removed_prototypes"]
        == ProtoQuant.load(checkpoint).head.num_prototypes
    )
    assert info["per_class_size"] <= 2 and "## Edit history" in info["card"]


def test_info_text_shows_the_card_and_the_history(checkpoint, tmp_path, capsys) -> None:
    code, stdout, _ = _run(capsys, "info", "--model", str(checkpoint))
    assert code == 0 and "# ProtoQuant" in stdout and "No edits" in stdout
    out = tmp_path / "edited"
    assert _run(capsys, "edit", "--model", str(checkpoint), "--out", str(out), "--top_k", "1")[0] == 0
    code, stdout, _ = _run(capsys, "info", "--model", str(out))
    assert code == 0 and "1. top_k(k=1) at " in stdout and "| top_k | k=1 |" in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "no edit asked for"),
        (("--top_k", "0"), "--top_k must be >= 1"),
        (("--disable", "99"), "--disable '99'"),
        (("--disable", "1:nosuchclass"), "no class 'nosuchclass'"),
        (("--merge_cosine", "1.5"), "--merge_cosine must be in"),
        (("--prune_mode", "drop"), "--prune_mode applies to --remove_unused"),
    ],
)
def test_bad_edits_fail_before_any_work(checkpoint, tmp_path, capsys, extra, message) -> None:
    code, _, stderr = _run(capsys, "edit", "--model", str(checkpoint), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and stderr.startswith("protoquant: error: ") and message in stderr
    assert not (tmp_path / "o").exists()


def test_edit_never_overwrites_unless_asked(checkpoint, tmp_path, capsys) -> None:
    before = (checkpoint / "model.safetensors").read_bytes()
    code, _, stderr = _run(
        capsys, "edit", "--model", str(checkpoint), "--out", str(checkpoint), "--top_k", "2"
    )
    assert code == 2 and "is the input checkpoint; pass --overwrite" in stderr
    assert (checkpoint / "model.safetensors").read_bytes() == before
    copy = tmp_path / "copy"
    assert _run(capsys, "edit", "--model", str(checkpoint), "--out", str(copy), "--top_k", "3")[0] == 0
    args = ("edit", "--model", str(copy), "--out", str(copy), "--top_k", "2", "--overwrite")
    assert _run(capsys, *args)[0] == 0
    assert [e.operation for e in ProtoQuant.load(copy).edits] == ["top_k", "top_k"]


def test_info_of_a_missing_checkpoint_is_a_usage_error(tmp_path, capsys) -> None:
    code, _, stderr = _run(capsys, "info", "--model", str(tmp_path))
    assert code == 2 and "is not a checkpoint" in stderr
