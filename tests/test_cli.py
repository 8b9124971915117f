"""Command line: flags derived from the config, clear errors, the demo path end to end (tiny)."""

import json

import pytest

from protoquant.cli import main

TINY = [
    "--backbone.name", "timm/test_convnext", "--backbone.weights", "none", "--backbone.image_size", "64",
    "--data.synthetic_classes", "3", "--data.synthetic_train_per_class", "6", "--data.synthetic_test_per_class", "3",
    "--cache.train_views", "1", "--codebook.num_prototypes", "8", "--codebook.epochs", "2",
    "--codebook.kmeans_patches", "500", "--probe.epochs", "5", "--head.epochs", "5",
    "--head.temperature_grid", "", "--head.lr_grid", "",
]  # fmt: skip


def test_help_config_lists_every_section(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for flag in (
        "--codebook.num_prototypes",
        "--head.temperature",
        "--data.dataset",
        "--backbone.weights",
        "--cache.train_views",
    ):
        assert flag in text


def test_unknown_dataset_is_a_clear_error(capsys, tmp_path):
    code = main(["train", "--out", str(tmp_path), "--data.dataset", "nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "synthetic" in err


def test_bad_flag_value_names_the_field(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path), "--codebook.num_prototypes", "many"]) == 2
    assert "codebook.num_prototypes" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_demo_train_evaluate_predict(tiny_demo, tmp_path, capsys):
    out = tiny_demo
    metrics = json.loads((out / "metrics.json").read_text())
    for section, key in [("linear_probe", "test_accuracy"), ("quantized", "test_accuracy"), ("protoquant", "test_accuracy"),
                         ("protoquant", "num_prototypes"), ("timing", "cache_seconds"), ("timing", "train_seconds")]:  # fmt: skip
        assert key in metrics[section]
    assert (out / "explanation.png").stat().st_size > 0
    capsys.readouterr()

    assert main(["evaluate", "--model", str(out / "model"), "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["protoquant"]["test_accuracy"])
    assert report["num_images"] == metrics["data"]["test"]

    image = tmp_path / "x.png"
    from protoquant.data import SyntheticParts

    SyntheticParts("test", num_classes=3, images_per_class=1, image_size=64).load_image(0).save(image)
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "model"), str(image), "--top", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["top"]) == 2 and line["top"][0]["probability"] >= line["top"][1]["probability"]


def test_predict_unreadable_image(tiny_demo, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="bad.jpg"):
        main(["predict", "--model", str(tiny_demo / "model"), str(bad)])
