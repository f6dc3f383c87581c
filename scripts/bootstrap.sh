#!/usr/bin/env bash
# Set up sigprop on this machine, then run the main job or the test suite.
#
#   bash scripts/bootstrap.sh train [sigprop train flags...]
#   bash scripts/bootstrap.sh test  [pytest args...]
#
# Installs, only where missing: PyTorch (the CPU build, 2.13.0, before anything can
# pull a multi-GB CUDA build), this package with its test extras, and Fashion-MNIST
# (Debian package dataset-fashion-mnist, when running as root). Anything it cannot
# install, it says in one line what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "bootstrap: $*" >&2; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  say "installing torch==2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0 \
    || { say "could not install PyTorch; install it (https://pytorch.org/get-started), then rerun"; exit 1; }
fi
# (re)install when missing, or when the installed sigprop is another checkout's
here=$(pwd -P)/src/sigprop
there=$("$PY" -c "import sigprop, pytest, scipy, tqdm, matplotlib, os; print(os.path.dirname(os.path.realpath(sigprop.__file__)))" 2>/dev/null || true)
if [ "$there" != "$here" ] || ! command -v sigprop >/dev/null; then
  say "installing sigprop (editable) with its test extras"
  "$PY" -m pip install -q -e ".[test]" \
    || { say "could not install sigprop; run: $PY -m pip install -e '.[test]'"; exit 1; }
fi

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -e "$FMNIST" ] && [ -z "${SIGPROP_DATA:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
      || say "could not install dataset-fashion-mnist; run: sigprop data download fashion-mnist"
  else
    say "Fashion-MNIST not found; run: sudo apt-get install dataset-fashion-mnist (or: sigprop data download fashion-mnist)"
  fi
fi

job=${1:-}
shift || true
case "$job" in
  train) exec sigprop train "$@" ;;
  test) exec "$PY" -m pytest -q "$@" ;;
  *) say "usage: bash scripts/bootstrap.sh train|test [args...]"; exit 2 ;;
esac
