"""An example sigprop plugin (docs/EXTENDING.md): the rule ``top-k`` in ``top_k.py``."""
