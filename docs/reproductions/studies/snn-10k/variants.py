"""sp-surrogate variants (diagnostics, docs/studies/spiking-local-loss.md), chosen by SNN_VARIANT:

* ``current``: the label projection (Eq. 1) makes block 1's *current* (128 x H x W,
  after its conv and BatchNorm) for each class instead of an input image; the target
  currents enter block 1's IF neurons beside the inputs' currents.
* ``current-relu``: as ``current``, and every block's local loss compares
  leaky_relu(u - theta) of the charged voltage u instead of the surrogate g(u - theta).

    SNN_VARIANT=current python variants.py train --network snn-conv --rule sp-surrogate \
        --train-limit 10000 --epochs 5 --run-dir runs/x
    SNN_VARIANT=current python variants.py probe runs/x --train-limit 20000

(``probe`` runs scripts/snn_probe.py, from the repository root, with the variant loaded.)
"""
import os
import sys

import torch
import torch.nn.functional as F

import sigprop.rules.spiking as S
from sigprop.cli import main
from sigprop.networks.spiking import SpikingBlock
from sigprop.signals.label import LabelProjection

variant = os.environ.get("SNN_VARIANT", "")
if variant not in ("current", "current-relu"):
    print(f"variants.py: error: SNN_VARIANT={variant!r}; set it to current or current-relu",
          file=sys.stderr)
    sys.exit(2)
orig_init = S.SpikingSigprop.__init__
orig_charge = SpikingBlock.charge


_with_targets = [False]  # the rule's own passes only: the bare network(x) has none


def charge(self, x, n=None):
    h = orig_charge(self, x, n)
    fn = getattr(self, "_targets_fn", None)
    if fn is None or not _with_targets[0]:
        return h
    return torch.cat([h, fn().to(h.dtype)])


def with_targets(method):
    def run(self, *args, **kwargs):
        _with_targets[0] = True
        try:
            return method(self, *args, **kwargs)
        finally:
            _with_targets[0] = False
    return run


def init(self, network, num_classes, cfg):
    orig_init(self, network, num_classes, cfg)
    first = network.blocks[0]
    shape = tuple(self._charged_shapes(network)[0])  # (C, H, W) of block 1's current
    self.signal = LabelProjection(num_classes, shape, learned=cfg.signal_learned)
    with torch.no_grad():  # currents after BatchNorm are ~N(0, 1): targets on that scale
        self.signal.proj.weight.normal_(0.0, 1.0)
        self.signal.proj.bias.zero_()
    self.modules["signal"] = self.signal
    first._targets_fn = lambda: self.signal.targets(first.synapse.weight)
    self._build_optimizer()  # the new projection in block 1's group


def activity(self, charged, block):
    return F.leaky_relu(charged - block.node.threshold, 0.01)


SpikingBlock.charge = charge
S.SpikingSigprop.__init__ = init
S.SpikingSigprop._inputs_and_targets = lambda self, x: x
S.SpikingSigprop._train_step = with_targets(S.SpikingSigprop._train_step)
S.SpikingSigprop._exit_scores = with_targets(S.SpikingSigprop._exit_scores)
if variant == "current-relu":
    S.SpikingSigprop._activity = activity
if sys.argv[1:2] == ["probe"]:
    import runpy
    sys.argv = ["snn_probe.py", *sys.argv[2:]]
    runpy.run_path("scripts/snn_probe.py", run_name="__main__")
else:
    sys.exit(main(sys.argv[1:]))
