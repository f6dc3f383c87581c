#!/usr/bin/env bash
# Checks that need a CUDA GPU, in one go (for a machine with a GPU and PyTorch already
# installed; the package runs from src/, nothing is installed):
#   1. tests/test_cuda.py (every rule's steps on the GPU against the CPU, loader, custom
#      autograd Functions, a CLI run, resume), then the whole fast suite;
#   2. benchmarks/throughput_memory.py on the GPU (batch 128 and 1024);
#   3. full Fashion-MNIST runs on the GPU: fc-3x1000 (dropout 0.1) and fc-2x800,
#      sigprop / backprop / shallow, EPOCHS epochs, seed 0, then a Markdown summary.
#
#   bash scripts/gpu_check.sh OUT_DIR [DATA_DIR] [EPOCHS]
#
# DATA_DIR holds fashion-mnist/ (default: the usual lookup). Everything it prints goes
# to OUT_DIR/gpu_check.log; the runs' metrics and configs (no checkpoints) to
# OUT_DIR/runs.tgz. A failing step is reported and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [DATA_DIR] [EPOCHS]}
data=${2:-}
epochs=${3:-10}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
[ -n "$data" ] && export SIGPROP_DATA=$(cd "$data" && pwd)
exec > >(tee "$out/gpu_check.log") 2>&1
status=0
step() { echo "== $* ($(date -u +%H:%M:%S))"; "$@" || { echo "!! failed ($?): $*"; status=1; }; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

step python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cuda.py
for b in 128 1024; do
  step python3 benchmarks/throughput_memory.py --device cuda --threads 1 --batch-size $b \
    --json "$out/bench_cuda_b$b.json"
done
runs=runs/gpu-check
for net in "fc-3x1000 0.1" "fc-2x800 0.0"; do
  set -- $net
  for rule in sigprop backprop shallow; do
    step python3 -m sigprop train --dataset fashion-mnist --network "$1" --dropout "$2" \
      --rule "$rule" --epochs "$epochs" --seed 0 --device cuda --no-progress \
      --run-dir "$runs/$1-do$2-$rule-e$epochs-s0"
  done
done
step python3 scripts/summarize.py $runs/*
tar czf "$out/runs.tgz" --exclude=checkpoint.pt $runs
exit $status
