#!/usr/bin/env bash
# Issues 10, 11 and 12 (docs/studies/conv.md, vgg8b.md, equilibrium-propagation.md):
# convolutional nets, the comparison rules and equilibrium propagation on full
# Fashion-MNIST, in the background:
#   nohup bash scripts/results_conv.sh > runs/results-conv.log 2>&1 &
# Every run resumes where it stopped when the script is started again (finished runs are
# skipped), so a later session continues it. Cheap runs first; VGG8b takes ~30-45 min an
# epoch per rule on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/results-conv

# train DIR ARGS...: train into DIR, resuming it if it holds a run
train() {
  local dir=$1; shift
  if [ -e "$dir/config.json" ]; then
    sigprop train --run-dir "$dir" --resume --no-progress "$@"
  else
    sigprop train --run-dir "$dir" --no-progress "$@"
  fi
}

# 1. CONV (Table VI's row): BP, FA, DFA, SP (2b), shallow, 3 epochs, full data
sigprop reproduce table6-conv-fmnist --budget quick --no-progress --out "$out/table6-conv-fmnist"
# 2. Table VI's fc rows: the FA and DFA columns (BP, SP, shallow were run before)
sigprop reproduce table6-fmnist --budget quick --no-progress
# 3. dense vs sparse targets on CONV, same budget as step 1's SP
train "$out/conv-sigprop-sparse" --network conv --dropout 0.1 --head classifier \
  --targets sparse --epochs 3
# 4. continuous time (issue 12): hopfield-2x1500, ep-loopback learned and fixed,
#    ep-symmetric, 3 epochs, batch 20 (Scellier & Bengio's), one intra-op thread each
for rule in "ep-loopback learned" "ep-loopback fixed" "ep-symmetric learned"; do
  set -- $rule
  (export OMP_NUM_THREADS=1; train "$out/hopfield-2x1500-$1-$2" --network hopfield-2x1500 \
    --rule "$1" --loopback "$2" --batch-size 20 --epochs 3)
done
# 5. VGG8b: BP, SP (2b, dense), LL-BP, LL-FA, shallow, 3 epochs, random crops (Sec. IV)
for rule in backprop sigprop ll-bp ll-fa shallow; do
  train "$out/vgg8b-$rule" --network vgg8b --dropout 0.1 --augment crop --head classifier \
    --rule "$rule" --epochs 3
done
# 6. dense vs sparse targets on VGG8b(2x), 10,000 images, the same budget each
for targets in dense sparse; do
  train "$out/vgg8b-2x-$targets" --network vgg8b-2x --dropout 0.1 --augment crop \
    --head classifier --targets "$targets" --train-limit 10000 --epochs 2
done
