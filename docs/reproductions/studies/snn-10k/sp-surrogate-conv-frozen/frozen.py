"""sp-surrogate with blocks 1-2 (and the targets' projection) frozen at their init."""
import sys
import sigprop.rules.spiking as S
from sigprop.cli import main
orig = S.SpikingSigprop.__init__
def init(self, *a, **k):
    orig(self, *a, **k)
    for g in self.optimizer.param_groups:
        if g["name"] in ("block1", "block2"):
            g["base_lr"] = 0.0
S.SpikingSigprop.__init__ = init
sys.exit(main(sys.argv[1:]))
