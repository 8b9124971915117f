"""One error boundary: every failure of `protoquant.cli.main` is one line on stderr and an exit status.

User-caused problems (config, images, checkpoints, devices) exit with 2 and name the file / field;
anything else is an internal error (exit 1); `--debug` adds the traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import protoquant.cli.data_commands as data_commands
from protoquant.cli import main
from protoquant.cli.failures import is_user_error, message
from protoquant.config import BackboneConfig, RunConfig
from protoquant.errors import CheckpointError, ConfigError, DataError, ProtoQuantError
from protoquant.head import ProtoQuantHead
from protoquant.model import ProtoQuant

IMAGE_SIZE, NUM_PROTOTYPES, CLASSES = 64, 8, ("a", "b", "c")
DATA_CHECK = ["data", "check", "--dataset", "synthetic", "--skip_images"]


def _failure(argv: list[str], capsys, status: int = 2) -> str:
    """Run the CLI; assert one error line on stderr, no traceback and `status`; return the line."""
    assert main(argv) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    prefix = "protoquant: error: " if status == 2 else "protoquant: internal error: "
    assert lines[0].startswith(prefix), err
    return lines[0]


def _raising(monkeypatch, error: BaseException) -> None:
    """Make `data check` raise `error` when it runs."""

    def fail(args):
        raise error

    monkeypatch.setattr(data_commands, "data_check", fail)


def test_error_types_are_value_errors() -> None:
    for kind in (ConfigError, DataError, CheckpointError):
        assert issubclass(kind, ProtoQuantError) and issubclass(kind, ValueError)


def test_a_bad_config_file_is_one_line_naming_it(tmp_path, capsys) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("codebook: [unclosed\n  - x: {\n")
    assert "broken.yaml" in _failure(["train", "--config", str(path)], capsys)
    path.write_bytes(b"\xff\xfe\x00bad")
    assert "broken.yaml" in _failure(["train", "--config", str(path)], capsys)
    path.write_text("codebook:\n  init: random\n")
    line = _failure(["train", "--config", str(path)], capsys)
    assert "broken.yaml" in line and "codebook.init" in line and "'kmeans'" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_before_or_after_the_command(where, tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("seed: -1\n")
    argv = ["train", "--config", str(path)]
    assert main(["--debug", *argv] if where == "before" else [*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("protoquant: error:") and "'seed'" in err


def test_internal_errors_say_so_with_the_type(monkeypatch, capsys) -> None:
    _raising(monkeypatch, ZeroDivisionError("division by zero"))
    line = _failure(DATA_CHECK, capsys, status=1)
    assert line == (
        "protoquant: internal error: ZeroDivisionError: division by zero "
        "(rerun with --debug for the traceback)"
    )
    assert main([*DATA_CHECK, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch, capsys) -> None:
    _raising(monkeypatch, KeyboardInterrupt())
    assert main(DATA_CHECK) == 130
    assert capsys.readouterr().err.strip() == "protoquant: error: interrupted"


def test_a_torch_shape_mismatch_is_the_inputs_fault_other_runtime_errors_are_not(monkeypatch, capsys):
    try:
        torch.zeros(2, 3) @ torch.zeros(4, 5)
    except RuntimeError as err:
        shape_error = err
    _raising(monkeypatch, shape_error)
    assert "cannot be multiplied" in _failure(DATA_CHECK, capsys)
    _raising(monkeypatch, RuntimeError("CUDA driver exploded"))
    assert "RuntimeError: CUDA driver exploded" in _failure(DATA_CHECK, capsys, status=1)


def test_library_file_errors_are_user_errors() -> None:
    import yaml
    from safetensors import SafetensorError

    for error in (
        yaml.YAMLError("bad"),
        SafetensorError("bad"),
        json.JSONDecodeError("x", "d", 0),
        KeyError("k"),
    ):
        assert is_user_error(error), error
    assert message(KeyError("weights_hash")) == "missing key 'weights_hash'"
    assert not is_user_error(AttributeError("x")) and not is_user_error(RuntimeError("x"))


class _BadImages(torch.utils.data.Dataset):
    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        from protoquant.data.images import open_rgb

        return torch.zeros(1) if index == 0 else open_rgb(self.path)


def test_a_dataloader_worker_error_prints_only_the_original_line(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    def load(args):
        loader = torch.utils.data.DataLoader(_BadImages(bad), batch_size=None, num_workers=1)
        return len(list(loader))

    monkeypatch.setattr(data_commands, "data_check", load)
    line = _failure(DATA_CHECK, capsys)
    assert line.startswith(f"protoquant: error: cannot read image {bad}: ")
    assert "DataLoader worker process" not in line and "Original Traceback" not in line


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b"this is text, not pixels", "UnidentifiedImageError"),
        (None, "truncated"),  # the first half of a real JPEG
        ("folder", "folder"),
        ("missing", "not found"),
    ],
)
def test_a_bad_image_is_a_data_error_naming_it(content, why, checkpoint, tmp_path, capsys) -> None:
    from protoquant.data.images import open_rgb

    path = tmp_path / "photo.jpg"
    if content is None:
        Image.new("RGB", (64, 64), (200, 10, 10)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "folder":
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    with pytest.raises(DataError, match=str(path)) as error:
        open_rgb(path)
    assert why.lower() in str(error.value).lower()
    line = _failure(["predict", "--model", str(checkpoint), str(path)], capsys)
    assert str(path) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_gpu_device_without_a_gpu_says_so(device, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    line = _failure(["train", "--out", str(out), "--device", device], capsys)
    assert f"device '{device}' requested but torch.cuda.is_available() is False (no GPU / driver)" in line
    assert not out.exists()


def test_cross_field_problems_fail_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    flags = ["--codebook.num_prototypes", "64", "--codebook.kmeans_patches", "10"]
    line = _failure(["train", "--out", str(out), "--device", "cpu", *flags], capsys)
    assert "codebook.kmeans_patches" in line and "codebook.num_prototypes" in line and not out.exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, backbone_factory) -> Path:
    """A saved tiny model (random test_convnext backbone, random head) for tampering."""
    backbone = backbone_factory("timm/test_convnext")
    config = RunConfig(
        backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=IMAGE_SIZE),
        device="cpu",
    )
    codebook = torch.randn(NUM_PROTOTYPES, backbone.info.channels, generator=torch.Generator().manual_seed(0))
    model = ProtoQuant(backbone, ProtoQuantHead(codebook, len(CLASSES)), CLASSES, config)
    return model.save(tmp_path_factory.mktemp("errors") / "model")


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "x.png"
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (10, 120, 200)).save(path)
    return path


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "model"))


def _refused(path: Path, image: Path, capsys, *words: str) -> None:
    """Loading `path` raises a CheckpointError, and `predict` fails in one line, both naming `words`."""
    with pytest.raises(CheckpointError) as error:
        ProtoQuant.load(path)
    line = _failure(["predict", "--model", str(path), str(image)], capsys)
    for word in words:
        assert word in str(error.value) and word in line, (word, line)


def test_the_untouched_checkpoint_loads(checkpoint, image, capsys) -> None:
    assert ProtoQuant.load(checkpoint).classes == CLASSES
    assert main(["predict", "--model", str(checkpoint), str(image)]) == 0


@pytest.mark.parametrize("cut", [0.5, 0.0, "garbage"])
def test_a_truncated_or_garbage_head_file_is_refused(cut, checkpoint, image, tmp_path, capsys) -> None:
    path = _copy(checkpoint, tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x00garbage" * 9 if cut == "garbage" else data[: int(len(data) * cut)])
    _refused(path, image, capsys, str(file))


@pytest.mark.parametrize("field", ["config", "classes", "temperature", "backbone.weights_hash", "<not json>"])
def test_a_bad_config_json_is_refused_naming_the_field(field, checkpoint, image, tmp_path, capsys) -> None:
    path = _copy(checkpoint, tmp_path)
    file = path / "config.json"
    meta = json.loads(file.read_text())
    if field == "<not json>":
        file.write_text("{'format': 1,")
        _refused(path, image, capsys, str(file), "JSON")
        return
    *parents, leaf = field.split(".")
    del (meta[parents[0]] if parents else meta)[leaf]
    file.write_text(json.dumps(meta))
    _refused(path, image, capsys, str(file), f"'{field}'")


def _tamper(path: Path, **changes: torch.Tensor) -> Path:
    file = path / "model.safetensors"
    tensors = {**load_file(str(file)), **changes}
    save_file(tensors, str(file))
    return file


def test_a_codebook_of_the_wrong_width_is_refused(checkpoint, image, tmp_path, capsys) -> None:
    path = _copy(checkpoint, tmp_path)
    width = load_file(str(checkpoint / "model.safetensors"))["codebook"].shape[1]
    file = _tamper(path, codebook=torch.randn(NUM_PROTOTYPES, width + 1))
    _refused(path, image, capsys, str(file), "'codebook'", f"D = {width}")


def test_a_head_for_other_classes_is_refused(checkpoint, image, tmp_path, capsys) -> None:
    path = _copy(checkpoint, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["classes"] = [*CLASSES, "extra"]
    (path / "config.json").write_text(json.dumps(meta))
    _refused(path, image, capsys, "'class_layer.weight'", f"({len(CLASSES)}, {NUM_PROTOTYPES})", "4 classes")


@pytest.mark.parametrize("name", ["codebook", "class_layer.weight", "usage"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_tensor_is_refused_naming_it(name, value, checkpoint, image, tmp_path, capsys) -> None:
    path = _copy(checkpoint, tmp_path)
    tensor = load_file(str(checkpoint / "model.safetensors"))[name].clone()
    tensor.view(-1)[0] = value
    file = _tamper(path, **{name: tensor})
    _refused(path, image, capsys, str(file), f"'{name}'", "NaN or infinite")


def test_a_non_finite_backbone_tensor_is_refused(checkpoint, image, tmp_path, capsys) -> None:
    path = _copy(checkpoint, tmp_path)
    file = path / "backbone.safetensors"
    tensors = load_file(str(file))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(file))
    _refused(path, image, capsys, str(file), f"'{name}'")
