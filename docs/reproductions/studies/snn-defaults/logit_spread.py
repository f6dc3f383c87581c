"""How far each block's logits separate on trained spiking sigprop runs.

    python docs/reproductions/studies/snn-defaults/logit_spread.py [--logit-c C] RUN_DIR [...]

For the first 256 Fashion-MNIST test images: per block, the spread of the logits
(standard deviation of each sample's ten scores about their mean, over samples and time
steps), the softmax's mean largest probability and mean probability of the true class,
and the exit's accuracy on these images. Library API only (sigprop.engine.load_trained).
``--logit-c C`` scores with c/sqrt(d) instead of the rule's c (runs of surrogate-leaky
made before its default c became 4 trained with c = 1).
"""

import argparse
import math

import torch

from sigprop.data.datasets import load_dataset
from sigprop.engine import load_trained

x, y = load_dataset("fashion-mnist", "test")
x = (x[:256].float() / 255 - 0.286) / 0.353  # the loader's standardisation of Fashion-MNIST
y = y[:256]
p = argparse.ArgumentParser()
p.add_argument("--logit-c", type=float, default=None)
p.add_argument("runs", nargs="+")
args = p.parse_args()
for run in args.runs:
    exp, cfg, state, ckpt = load_trained(run)
    rule = exp.rule
    if args.logit_c is not None:
        shapes = rule._charged_shapes(rule.network)
        rule.scales = [args.logit_c / math.sqrt(math.prod(s)) for s in shapes]
    rule.network.eval()
    n, cells = x.shape[0], []
    with torch.no_grad():
        h, extra = rule._inputs_and_targets(x)
        for i, block in enumerate(rule.network.blocks):
            out, charged = block.run(h, n, detach_carry=True, extra=extra if i == 0 else None)
            s = rule._scores(rule._activity(charged, block), n, i)  # [T, n, classes]
            p = torch.softmax(s, -1)
            spread = (s - s.mean(-1, keepdim=True)).std().item()
            true = p.gather(-1, y.view(1, -1, 1).expand(s.shape[0], -1, 1)).mean().item()
            acc = (s.mean(0).argmax(1) == y).float().mean().item()
            cells.append(f"block {i + 1}: spread {spread:.3f}, max p {p.max(-1).values.mean():.3f}, "
                         f"p(true) {true:.3f}, exit acc {acc:.3f}")
            h = out
    print(f"{run} ({rule.compare}, scales {[f'{v:.2g}' for v in rule.scales]}):\n  "
          + "\n  ".join(cells))
