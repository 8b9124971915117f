"""Command line: flags and help from the config, checks before any work, errors, text and JSON output."""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from protoquant import __version__, progress
from protoquant.cli import build_parser, main
from protoquant.cli.checks import BACKBONE_LIBRARIES
from protoquant.cli.output import to_json
from protoquant.cli.parsing import expand_lists
from protoquant.config import RunConfig, flat_fields, leaf_fields, load_yaml, with_overrides

TINY = [
    "--backbone.name", "timm/test_convnext", "--backbone.weights", "none", "--backbone.image_size", "64",
    "--data.synthetic_classes", "3", "--data.synthetic_train_per_class", "6", "--data.synthetic_test_per_class", "3",
    "--cache.train_views", "1", "--codebook.num_prototypes", "8", "--codebook.epochs", "2",
    "--codebook.kmeans_patches", "500", "--probe.epochs", "5", "--head.epochs", "5",
    "--head.temperature_grid", "", "--head.lr_grid", "",
]  # fmt: skip


def test_help_shows_every_field_with_its_help_and_choices(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines: compare word sequences
    for name, spec in leaf_fields().items():
        assert f"--{name}" in text
        assert " ".join(spec.metadata["help"].split()[:4]) in text, name
    assert "--codebook.init {kmeans,orthogonal}" in text and "(>= 1)" in text


def test_help_config_lists_every_flag_with_value_and_choices(capsys):
    assert main(["train", "--help_config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(flat_fields())
    init = next(line for line in lines if "--codebook.init " in line)
    assert "'kmeans'" in init and "{kmeans,orthogonal}" in init and "k-means" in init


def test_help_runs_fast_paths_in_a_fresh_interpreter():
    """`--help` works as a program and loads no torch (the slow import) on the way."""
    for args in (["--help"], ["train", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "protoquant.cli", *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert ("evaluate" in done.stdout) if args == ["--help"] else ("{kmeans,orthogonal}" in done.stdout)
    code = (
        "import sys; from protoquant.cli import main; main(['demo', '--help']); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_python_m_protoquant_is_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "protoquant", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == f"protoquant {__version__}", done.stderr


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"protoquant {__version__}"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--codebook.init", "kmean"], ["--codebook.init", "'kmeans'"]),
        (["--head.scores_dtype", "int8"], ["--head.scores_dtype", "'float16'"]),
        (["--head.lr", "nan"], ["head.lr", "finite"]),
        (["--seed", "-1"], ["'seed'", ">= 0"]),
        (["--codebook.num_prototypes", "many"], ["--codebook.num_prototypes", "int"]),
        (["--codebook.cutmix_prob", "3"], ["codebook.cutmix_prob", "<= 1"]),
        (["--head.temperature_grid", "0.1,-1"], ["head.temperature_grid", "> 0"]),
        (["--data.dataset", "nope"], ["data.dataset", "nope", "synthetic"]),
        (["--backbone.name", "keras/resnet"], ["backbone.name", "timm"]),
        (["--data.val_fraction", "0"], ["data.val_fraction", "> 0"]),
        (["--device", "gpu"], ["device", "cuda"]),
        (["--data.root", "/no/such/folder"], ["data.root", "/no/such/folder"]),
        (["--backbone.weights", "missing.pth"], ["backbone.weights", "missing.pth"]),
        (["--codebook.num", "5"], ["--codebook.num_prototypes"]),  # no abbreviations; a suggestion
    ],
)
def test_bad_values_fail_before_any_work(flags, expected, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *flags]) == 2
    captured = capsys.readouterr()
    assert "protoquant: error:" in captured.err and "Traceback" not in captured.err
    assert all(word in captured.err for word in expected), captured.err
    assert not out.exists() and captured.out == ""


def test_every_problem_is_reported_at_once(capsys):
    assert main(["train", "--data.dataset", "nope", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "data.dataset" in err and "device" in err


def test_backbone_libraries_match_the_builders():
    from protoquant.backbones.frozen import BUILDERS

    assert set(BACKBONE_LIBRARIES) == set(BUILDERS)


def test_print_config_is_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "base.yaml"
    path.write_text("codebook:\n  num_prototypes: 64\nseed: 3\nhead:\n  lr_grid: [0.5]\n")
    flags = ["--seed", "5", "--head.temperature_grid", "0.05,0.1", "--cache.autocast_bf16", "true"]
    assert main(["train", "--config", str(path), *flags, "--print_config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    expected = with_overrides(
        load_yaml(path), {"seed": "5", "head.temperature_grid": "0.05,0.1", "cache.autocast_bf16": "true"}
    )
    assert load_yaml(printed) == expected and expected.codebook.num_prototypes == 64
    assert expected.head.lr_grid == (0.5,)  # from the file, untouched by the flags


def test_help_shows_the_config_files_values(tmp_path, capsys):
    path = tmp_path / "base.yaml"
    path.write_text("codebook:\n  num_prototypes: 77\n")
    assert main(["train", "--config", str(path), "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "K: codebook size = number of prototypes (>= 1) (default: 77)" in text


def test_demo_defaults_follow_out(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["out"] == str(tmp_path / "d") and config["cache"]["root"] == ""  # the shared default cache
    assert config["codebook"]["num_prototypes"] != RunConfig().codebook.num_prototypes  # demo settings


def test_bad_config_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("codebook:\n  num_prototype: 5\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "codebook.num_prototype" in err


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["train", "--print_config"], progress.NORMAL),
        (["-v", "train", "--print_config"], progress.VERBOSE),
        (["train", "--print_config", "-v"], progress.VERBOSE),
        (["train", "-q", "--print_config"], progress.QUIET),
        (["-q", "data", "check", "--dataset", "synthetic", "--skip_images", "-v"], progress.VERBOSE),
    ],
)
def test_verbosity_before_or_after_the_command(argv, level, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(progress, "configure", seen.append)
    assert main(argv) == 0
    assert seen == [level]


def test_one_flag_style_and_hidden_old_spellings(capsys):
    args = ["explain", "x.png", "--model", "m", "--out", "o"]
    assert build_parser(args).parse_args([*args, "--top-classes", "4"]).top_classes == 4
    assert build_parser(args).parse_args([*args, "--top_classes", "4"]).top_classes == 4
    assert main(["explain", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--top_classes" in text and "--top-classes" not in text


def test_expand_lists():
    flags = ["--head.lr_grid"]
    assert expand_lists(["--head.lr_grid", "0.1, 0.2", "--seed", "1"], flags) == [
        "--head.lr_grid", "0.1", "0.2", "--seed", "1",
    ]  # fmt: skip
    assert expand_lists(["--head.lr_grid=0.3"], flags) == ["--head.lr_grid", "0.3"]
    assert expand_lists(["--head.lr_grid", "", "--seed", "1"], flags) == ["--head.lr_grid", "--seed", "1"]
    assert expand_lists(["--head.lr_grid", "--seed", "1"], flags) == ["--head.lr_grid", "--seed", "1"]
    assert expand_lists(["--", "--head.lr_grid", "1,2"], flags) == ["--", "--head.lr_grid", "1,2"]


def test_json_is_strict():
    text = to_json({"a": math.nan, "b": [math.inf, 1.5], "c": (1, "x")})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [1, "x"]}


def test_data_check_text_and_json(capsys):
    base = ["data", "check", "--dataset", "synthetic", "--skip_images"]
    assert main(base) == 0
    assert "10 classes" in capsys.readouterr().out
    assert main([*base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == 10


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--out", str(out), *TINY, "--json"]) == 0
    return out, json.loads(stdout.getvalue())


def test_demo_json_names_the_files_and_metrics(tiny_demo):
    out, document = tiny_demo
    metrics = json.loads((out / "metrics.json").read_text())
    assert document["metrics"]["protoquant"]["test_accuracy"] == metrics["protoquant"]["test_accuracy"]
    for key in ("checkpoint", "metrics_file", "explanation", "report"):
        assert Path(document[key]).exists(), key
    assert (out / "explanation.png").stat().st_size > 0


def test_evaluate_text_and_json(tiny_demo, tmp_path, capsys):
    out, document = tiny_demo
    model = str(out / "model")
    assert main(["evaluate", "--model", model, "--out", str(tmp_path / "eval.json")]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "wrote" in text
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(document["metrics"]["protoquant"]["test_accuracy"])
    assert main(["evaluate", "--model", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report


def test_evaluate_rejects_unknown_metrics_before_loading(tiny_demo, capsys):
    model = str(tiny_demo[0] / "model")
    assert main(["evaluate", "--model", model, "--metrics", "purty"]) == 2
    assert "purty" in capsys.readouterr().err


def test_predict_text_and_json(tiny_demo, tmp_path, capsys):
    from protoquant.data import SyntheticParts

    image = tmp_path / "x.png"
    SyntheticParts("test", num_classes=3, images_per_class=1, image_size=64).load_image(0).save(image)
    model = str(tiny_demo[0] / "model")
    assert main(["predict", "--model", model, str(image), "--top", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ") and line.count("%") == 2
    assert main(["predict", "--model", model, str(image), "--top", "2", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]


def test_predict_unreadable_image_is_a_clear_error(tiny_demo, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", "--model", str(tiny_demo[0] / "model"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "protoquant: error:" in err and "bad.jpg" in err


@pytest.mark.parametrize(
    "command",
    [
        ["audit", "--no_noise"],
        ["gallery", "--top_k", "2"],
        ["explain", "IMAGE", "--out", "OUT", "--top_prototypes", "2"],
        ["predict", "IMAGE", "IMAGE"],
    ],
    ids=lambda command: command[0],
)
def test_json_mode_prints_one_document_and_nothing_else(command, tiny_demo, tmp_path, capsys):
    from protoquant.data import SyntheticParts

    image = tmp_path / "x.png"
    SyntheticParts("test", num_classes=3, images_per_class=1, image_size=64).load_image(0).save(image)
    command = [str(image) if a == "IMAGE" else str(tmp_path / "report") if a == "OUT" else a for a in command]
    assert main([*command, "--model", str(tiny_demo[0] / "model"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)  # the whole of stdout
    assert isinstance(document, dict) and document


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    for command in (["predict", str(tmp_path / "x.png")], ["gallery"], ["audit"], ["evaluate"]):
        assert main([*command, "--model", str(tmp_path / "nothing")]) == 2
        assert "nothing" in capsys.readouterr().err


def test_literal_fields_parse_from_flags(capsys):
    flags = [
        "--backbone.interpolation",
        "",
        "--head.scores_dtype",
        "float16",
        "--codebook.init",
        "orthogonal",
    ]
    assert main(["train", *flags, "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["backbone"]["interpolation"] == "" and config["head"]["scores_dtype"] == "float16"
    assert config["codebook"]["init"] == "orthogonal"
