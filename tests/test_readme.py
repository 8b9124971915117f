"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert python_blocks(), "README.md should show at least one Python example"


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in python_blocks():
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "readme" / "model" / "model.safetensors").is_file()
    prediction = namespace["prediction"]
    assert prediction.probabilities.shape == (3, 4)
