"""How many stages a run asks for: ``--split`` (blocks per stage) and ``--stages``.

Pure parsing, shared by the config's checks and sigprop.parallel (which fits the split
to a network).
"""

from __future__ import annotations

import re

from ..errors import ConfigError


def parse_split(text: str) -> list[int]:
    """``"2,1"`` -> [2, 1]: blocks per stage, first stage first."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*[0-9]+(\s*,\s*[0-9]+)*\s*", text):
        raise ConfigError(f"train.split must be blocks per stage as positive integers separated "
                          f"by commas (e.g. 2,1), got {text!r}")
    sizes = [int(t) for t in text.split(",")]
    if any(k < 1 for k in sizes):
        raise ConfigError(f"train.split {text!r} gives a stage no block; every stage needs "
                          "at least one")
    if len(sizes) < 2:
        raise ConfigError(f"train.split {text!r} names one stage; a split needs at least two "
                          "(or leave it out to train in one process)")
    return sizes


def stage_count(stages: int, split: str | None) -> int:
    """The number of stages a config asks for (``split`` wins: it names them)."""
    return len(parse_split(split)) if split is not None else stages
