#!/usr/bin/env bash
# docs/RESULTS.md, fully connected nets on full Fashion-MNIST: sigprop vs backprop vs
# shallow on fc-3x1000 (dropout 0.1) and fc-2x800, then a Markdown summary.
#   bash scripts/results_fc.sh [EPOCHS] [SEEDS...]      (default: 10 epochs, seed 0)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-10}; shift || true
seeds=${*:-0}
out=runs/results-fc
for seed in $seeds; do
  for net in "fc-3x1000 0.1" "fc-2x800 0.0"; do
    set -- $net
    for rule in sigprop backprop shallow; do
      dir=$out/$1-do$2-$rule-e$epochs-s$seed
      [ -e "$dir/checkpoint.pt" ] && resume=--resume || resume=
      sigprop train --dataset fashion-mnist --network "$1" --dropout "$2" --rule "$rule" \
        --epochs "$epochs" --seed "$seed" --run-dir "$dir" --no-progress $resume
    done
  done
done
python3 scripts/summarize.py $out/*
