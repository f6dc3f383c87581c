"""Entry point of one stage started by :mod:`.launch` (``python -m sigprop.parallel.worker``):
the run's config comes in ``SIGPROP_STAGE_CONFIG``, the rank in ``RANK``."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from .. import rules  # noqa: F401  (registers the rules)
from ..engine.config import config_from_dict
from ..engine.interrupt import Terminated, on_sigterm, one_line
from ..engine.perf import tune_allocator
from ..errors import SigpropError
from ..rules import load_plugins
from .launch import PEER_EXIT
from .runner import run_stage
from .transport import StageFailure


def main() -> int:
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        load_plugins()  # a plugin's options are in the config
        cfg = config_from_dict(json.loads(os.environ["SIGPROP_STAGE_CONFIG"]))
        tune_allocator()
        run_stage(cfg, Path(cfg.train.run_dir), os.environ.get("SIGPROP_STAGE_RESUME") == "1")
        return 0
    except StageFailure:
        return PEER_EXIT  # another stage stopped first: the launcher names it
    except SigpropError as err:
        print(f"sigprop: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        return stop.code if isinstance(stop, Terminated) else 130


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: after a failed stage, gloo's threads can
    abort the process while they are torn down ("terminate called without an active
    exception", SIGABRT), which would hide the exit code that says what happened."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
