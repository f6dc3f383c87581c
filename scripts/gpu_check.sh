#!/usr/bin/env bash
# Checks that need a CUDA GPU, in one go (for a machine with a GPU and PyTorch already
# installed; the package runs from src/, nothing is installed):
#   1. tests/test_cuda.py (every rule's steps on the GPU against the CPU, loader, custom
#      autograd Functions, a CLI run, resume), then the whole fast suite;
#   2. benchmarks/throughput_memory.py on the GPU (batch 128 and 1024), sigprop bench
#      (Tables I-IV) on VGG8b and VGG8b(2x), and benchmarks/snn_throughput.py (Table V's
#      spiking models, fp16 + GradScaler and float32);
#   3. Table VI's fully connected rows on full Fashion-MNIST on the GPU (sigprop,
#      backprop, shallow; `sigprop reproduce table6-fmnist --budget quick`, seed 0): the
#      report beside the paper's numbers, with plots.
#
#   bash scripts/gpu_check.sh OUT_DIR [DATA_DIR]
#
# DATA_DIR holds fashion-mnist/ (default: the usual lookup). Everything it prints goes
# to OUT_DIR/gpu_check.log; the reproduction's report, plots, metrics and configs (no
# checkpoints) to OUT_DIR/table6-fmnist.tgz. A failing step is reported and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT_DIR [DATA_DIR]}
data=${2:-}
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
# Tables I-IV on the GPU: time and memory per layer (allocator peaks), VGG8b and VGG8b(2x)
step python3 -m sigprop.cli bench --device cuda --network vgg8b --input 3x32x32 \
  --rules backprop,ll-bp,ll-fa,sigprop,dfa --targets dense,sparse --repeats 5 --warmup 3 \
  --json "$out/bench_vgg8b_cuda.json"
step python3 -m sigprop.cli bench --device cuda --network vgg8b-2x --input 3x32x32 \
  --rules sigprop --targets dense,sparse --repeats 5 --warmup 3 --json "$out/bench_vgg8b2x_cuda.json"
# Table V's spiking models on the GPU (fp16 autocast with a GradScaler, and float32)
step python3 benchmarks/snn_throughput.py --device cuda --amp on,off --steps 5 --repeats 5 \
  --json "$out/bench_snn_cuda.json"
# layer-parallel stages over NCCL: one CUDA device per process, so only with 2 or more
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  step python3 -m sigprop.cli train --device cuda --network fc-4x1000 --stages 2 --epochs 1 \
    --no-progress --run-dir runs/gpu-check/stages2
else
  echo "== layer-parallel over NCCL skipped: one CUDA device (NCCL needs one per stage)"
fi
runs=runs/gpu-check/table6-fmnist
step python3 -m sigprop.cli reproduce table6-fmnist --budget quick --seeds 0 --device cuda \
  --no-progress --out "$runs"
tar czf "$out/table6-fmnist.tgz" --exclude=checkpoint.pt "$runs"
exit $status
