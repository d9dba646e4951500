#!/usr/bin/env bash
# One set-up path for a fresh machine (DESIGN §5):
#   1. a virtualenv in .venv (override with TEC_VENV),
#   2. torch 2.14.1 + torchvision 0.29.1 from the machine's local package store,
#   3. the project with its dev extra (editable),
#   4. the Fashion-MNIST Debian package when missing (installed if we are root, otherwise we say how).
# Idempotent: a stamp keyed on pyproject.toml skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${TEC_VENV:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
FMNIST_DIR="${TEC_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi

stamp="$VENV/.setup-stamp"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "python packages up to date ($VENV)"
else
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if ! "$VENV/bin/python" -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')))" 2>/dev/null; then
        say "installing ${TORCH_PINS[*]} (local package store, about a minute)"
        "$VENV/bin/python" -m pip install -q "${TORCH_PINS[@]}"
    fi
    say "installing tec-pipeline and its dev extra"
    "$VENV/bin/python" -m pip install -q -e '.[dev]' "${TORCH_PINS[@]}"
    echo "$want" > "$stamp"
fi

if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] || [ -f "$FMNIST_DIR/train-images-idx3-ubyte" ]; then
    say "Fashion-MNIST found in $FMNIST_DIR"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
        || say "WARNING: apt-get could not install dataset-fashion-mnist; tests that need it will be skipped"
else
    say "Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist"
    say "(or point TEC_FASHION_MNIST_DIR at a folder holding the four IDX files)"
fi
say "ready: $VENV/bin/python"
