"""Block 1 of snn-conv trained alone by a sigprop local loss, then probed
(docs/studies/spiking-local-loss.md).

    OMP_NUM_THREADS=1 python block1_study.py VARIANT [STEPS=240]

Trains only block 1 (3x3 conv 1->128, BatchNorm with the inputs' statistics, IF at
threshold 0.5, T = 4, 2x2 max-pool) for STEPS Adam steps (5e-4, batch 128) on the
first 10,000 Fashion-MNIST training images with one target per class, then prints its
early exit's test accuracy and a linear probe of its pooled output spikes (and of its
max-pooled mean charged voltages): standardised features of the first 10,000 training
images, Adam 1e-3, batch 256, 10 epochs, L2 1e-4, scored on the 10,000 test images.

VARIANT words (combined with '-'):
  random     no training (the baseline the probe should keep)
  input      targets are images at the network input, through conv + BN + IF (ours)
  current    targets are block 1's currents (128x28x28 after conv + BN), into the IF
  volt       the loss compares the charged voltage u (sp-voltage, c = 1/32)
  relu       the loss compares leaky_relu(u - theta) instead of g(u - theta)
  center     the inputs' batch mean (per feature and step) is subtracted first
  l2         Eq. 7 instead of the dot product
  noaffine   BatchNorm's weight and bias stay at 1 and 0
  pooled     compare 4x4 average-pooled activity (not in the study)
  v          a label only (the runs named *-v, which also printed the voltage probe)
  ann        no spiking: the block's output is leaky_relu(BN(conv x)) (annsurr:
             g(BN(conv x) - theta)), targets at that output, compared there
Default comparison: the surrogate g(u - theta) of Eq. 16 (sp-surrogate), dot, c = 1.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "scripts"))
from snn_probe import probe as linear_probe  # noqa: E402

from sigprop.data.datasets import dataset_spec, load_dataset
from sigprop.networks.spiking import SpikingBlock
from sigprop.functional.spiking import surrogate_activity, step_similarity, if_run
from sigprop.networks.batchnorm import input_stats_norm

torch.manual_seed(0)
WORDS = {"random", "input", "current", "volt", "relu", "center", "l2", "noaffine", "ann",
         "annsurr", "v", "pooled"}
if len(sys.argv) not in (2, 3) or not set(sys.argv[1].split("-")) <= WORDS \
        or (len(sys.argv) == 3 and not (sys.argv[2].isdigit() and int(sys.argv[2]) > 0)):
    print("block1_study.py: error: give VARIANT (words of the docstring joined by '-') "
          "and optionally a positive number of steps", file=sys.stderr)
    sys.exit(2)
variant = sys.argv[1]
steps_total = int(sys.argv[2]) if len(sys.argv) > 2 else 240
spec = dataset_spec("fashion-mnist")
xtr, ytr = load_dataset("fashion-mnist", "train", None)
xte, yte = load_dataset("fashion-mnist", "test", None)
def prep(x):
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.dim() == 3: x = x[:, None]
    m = torch.tensor(spec.mean).view(1, -1, 1, 1); s = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - m) / s
xtr, xte = prep(xtr[:20000]), prep(xte)
ytr = ytr[:20000].long(); yte = yte.long()
print(variant, xtr.shape, xtr.mean().item(), xtr.std().item(), flush=True)
T, thr, m = 4, 0.5, 10
block = SpikingBlock(nn.Conv2d(1, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), pool=True, first=True)
block.node.threshold.fill_(thr)
d = 128 * 28 * 28
if variant.startswith("current") or "ann" in variant:
    proj = nn.Linear(m, d)
else:
    proj = nn.Linear(m, 28 * 28)
with torch.no_grad():
    proj.weight.normal_(0, 1); proj.bias.zero_()
params = list(block.synapse.parameters()) + list(proj.parameters())
if "noaffine" not in variant:
    params += list(block.norm.parameters())
opt = torch.optim.Adam(params, 5e-4)
scale = (1.0 if "volt" not in variant else 1 / 32) / math.sqrt(d)
if "pooled" in variant:
    scale = 1.0 / math.sqrt(128 * 7 * 7)

def leaky(z): return F.leaky_relu(z, 0.01)

def activity(charged):
    if "ann" in variant:
        return charged
    if "relu" in variant:
        a = leaky(charged - thr)
    else:
        a = charged if "volt" in variant else surrogate_activity(charged, thr)
    if "pooled" in variant:
        a = F.avg_pool2d(a.flatten(0, 1), 4).unflatten(0, a.shape[:2])
    return a

def forward(x, n, train=True):
    """charged [T, n+m, ...], spikes."""
    eye = torch.eye(m)
    t = leaky(proj(eye))
    if "ann" in variant:
        z = block.synapse(x)
        hx = input_stats_norm(block.norm, z, n) if train else block.norm(z)
        act = (lambda z: surrogate_activity(z, thr)) if "annsurr" in variant else leaky
        a = torch.cat([act(hx), t.view(m, 128, 28, 28)])
        return None, a[None]
    if variant.startswith("current"):
        z = block.synapse(x)
        hx = input_stats_norm(block.norm, z, n) if train else block.norm(z)
        h = torch.cat([hx, t.view(m, 128, 28, 28)])
        spikes, charged = if_run(h, block.node.threshold, T, bptt=False)
    else:
        h = torch.cat([x, t.view(m, 1, 28, 28)])
        spikes, charged = block.run(h, n, detach_carry=True)
    return spikes, charged

def scores(charged, n):
    a = activity(charged)
    if "center" in variant:
        a = a - a[:, :n].mean(1, keepdim=True).detach()
    return step_similarity(a, n, "l2" if "l2" in variant else "dot", scale / 2 if "l2" in variant else scale)

def exit_acc():
    block.eval(); c = 0
    with torch.no_grad():
        for i in range(0, len(xte), 500):
            x = xte[i:i + 500]
            _, ch = forward(x, len(x), False)
            c += (scores(ch, len(x)).mean(0).argmax(1) == yte[i:i + 500]).sum().item()
    block.train()
    return c / len(xte)

t0 = time.time()
step = 0
if "random" not in variant:
    while step < steps_total:
        perm = torch.randperm(10000)
        for idx in perm.split(128):
            if len(idx) < 128 or step >= steps_total: break
            x, y = xtr[idx], ytr[idx]
            n = len(x)
            _, ch = forward(x, n)
            s = scores(ch, n)
            loss = F.cross_entropy(s.flatten(0, 1), y.repeat(s.shape[0]))
            opt.zero_grad(); loss.backward(); opt.step()
            step += 1
            if step % 80 == 0:
                print(f"step {step} loss {loss.item():.4f} train acc {(s.mean(0).argmax(1)==y).float().mean().item():.3f} {time.time()-t0:.0f}s", flush=True)
    print("exit acc", exit_acc(), flush=True)
# probe on spikes of inputs (eval mode)
block.eval()
vout = []
def feats(X):
    out = []
    with torch.no_grad():
        for i in range(0, len(X), 500):
            if "ann" in variant:
                act = (lambda z: surrogate_activity(z, thr)) if "annsurr" in variant else leaky
                out.append(F.max_pool2d(act(block.norm(block.synapse(X[i:i + 500]))), 2).flatten(1))
                continue
            s, ch = block.run(X[i:i + 500])
            out.append(s.float().mean(0).flatten(1))
            vout.append(F.max_pool2d(ch.float().mean(0), 2).flatten(1))
    return torch.cat(out)
ftr = feats(xtr[:10000]); vtr = torch.cat(vout) if vout else None; vout.clear()
fte = feats(xte); vte = torch.cat(vout) if vout else None
rate = fte.mean().item()
def probe(ftr, fte):
    """scripts/snn_probe.py's linear probe, 10 epochs: test accuracy."""
    return linear_probe(ftr, ytr[:len(ftr)], fte, yte, 10, 10, 0)[1]

p = probe(ftr, fte)
pv = probe(vtr, vte) if vtr is not None else float("nan")
print(f"RESULT {variant} steps {step} rate {rate:.3f} probe spikes {p:.4f} voltages {pv:.4f} ({time.time()-t0:.0f}s)", flush=True)
