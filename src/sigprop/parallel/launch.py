"""``sigprop train --stages S`` on one machine: start one process per stage (per stage and
replica with ``--replicas R``) and watch them.

The launcher checks everything it can first (config, network, split; one line and exit
2 on a bad one, before any process starts or any file is written), holds the run folder
(:class:`RunFolder`), settles the split once (:func:`.split.settle_plan`: by default a
short calibration of each block's step, or the split a resumed run recorded), prints
it with each stage's share of the step and the balance, hands it to every stage in
``SIGPROP_STAGE_PLAN`` (no stage times anything itself), picks a free port on the
loopback address, and starts
``python -m sigprop.parallel.worker`` S times with the environment torchrun would give
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), so a stage runs the same code under both.

Faults: when a stage ends with an error or is killed, the other stages notice at once
(their sockets to it close) and end; whoever has not ended ``GRACE_S`` seconds later is
sent SIGTERM, then SIGKILL. The launcher then says which stage failed and from which
checkpoint ``--resume`` continues (the last consistent one, which no stage's failure can
damage: sigprop.engine.runstate). Ctrl-C or SIGTERM to the launcher stops every stage the same way.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..engine.config import Config
from ..engine.interrupt import Terminated
from ..engine.runfolder import RunFolder
from ..engine.runstate import latest_kind, refuse_existing_run
from ..engine.trainer import build_config_rule, resolve_device
from .split import (
    check_devices, check_staging, describe_plan, recorded_plan, settle_plan, stage_ranges)
from .stage import stage_threads, timeout_s

GRACE_S = 30.0  # how long the other stages get to end on their own after one fails
KILL_S = 5.0  # after SIGTERM, before SIGKILL
PEER_EXIT = 3  # a stage's exit code when it stopped because another stage did


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_stages(cfg: Config):
    """Everything about the stages that can be checked before any process starts: the
    rule splits, the generator allows it, the split fits the network, the stage timeout
    is a number, the device exists. (The rule, built on the CPU; the processes.)"""
    timeout_s()
    rule = build_config_rule(cfg, resolve_device("cpu"))
    world = check_staging(rule, cfg) * cfg.train.replicas
    check_devices(cfg, world)
    resolve_device(cfg.train.device)
    return rule, world


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def launch(cfg: Config, resume: bool, out=None) -> int:
    """Run ``cfg`` in its stages on this machine; the exit code (0, 2, 130, 143)."""
    err_out = sys.stderr
    rule, world = check_stages(cfg)  # rank = replica * stages + stage
    replicas = cfg.train.replicas
    run_dir = Path(cfg.train.run_dir)
    folder = RunFolder.acquire(run_dir)
    procs: list[subprocess.Popen] = []
    ranges: list[tuple[int, int]] = []
    try:
        if not resume:
            refuse_existing_run(run_dir)
        before = _newest_epoch(run_dir)
        threads = stage_threads(cfg, world)
        plan = settle_plan(rule, cfg, threads, resolve_device(cfg.train.device),
                           recorded_plan(run_dir) if resume else None)
        del rule
        ranges = stage_ranges(plan["split"])
        for line in describe_plan(plan):
            print(line, file=out or sys.stdout, flush=True)
        env = dict(os.environ)
        env.update({
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "SIGPROP_LAUNCHER": "1", "SIGPROP_STAGE_CONFIG": json.dumps(cfg.to_dict()),
            "SIGPROP_STAGE_RESUME": "1" if resume else "0",
            "SIGPROP_STAGE_PLAN": json.dumps(plan),
            "OMP_NUM_THREADS": str(threads),
        })
        for r in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sigprop.parallel.worker"],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        failed, code = _watch(procs)
    except KeyboardInterrupt as stop:
        _stop(procs)
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"sigprop: {what}; every stage stopped; "
              f"{_resume_hint(run_dir, _newest_epoch(run_dir))}", file=err_out)
        return stop.code if isinstance(stop, Terminated) else 130
    finally:
        _stop(procs)
        if not any(p.returncode == 0 for p in procs):
            folder.discard_if_unused()
        folder.release()
    if failed is None:
        return 0
    after = _newest_epoch(run_dir)
    if code == 2 and after == before:
        return 2  # an error before any epoch of this launch ended: the stage's line says it all
    hint = _resume_hint(run_dir, after)
    stages = len(ranges)
    a, b = ranges[failed % stages]
    blocks = f"block {a + 1}" if b - a == 1 else f"blocks {a + 1}-{b}"
    copy = f", replica {failed // stages + 1}/{replicas}" if replicas > 1 else ""
    cause = "failed (its error is above)" if code in (2, 1) else _describe(code)
    print(f"sigprop: error: stage {failed % stages + 1}/{stages} ({blocks}{copy}) {cause}; "
          f"every stage has stopped; {hint}", file=err_out)
    return 2


def _watch(procs: list[subprocess.Popen]) -> tuple[int | None, int]:
    """Wait for every stage; (the stage that failed first, its exit code) or (None, 0).
    After a failure the others get GRACE_S to end, then SIGTERM, then SIGKILL."""
    failed, code, deadline = None, 0, None
    while True:
        running = [p for p in procs if p.poll() is None]
        done = [(r, p.returncode) for r, p in enumerate(procs)
                if p.returncode is not None and p.returncode != 0]
        if done and deadline is None:
            deadline = time.monotonic() + GRACE_S
        if failed is None:
            # the cause: a stage that did not stop because another did (a stage that
            # stopped because of a peer may be seen first: wait for the peer's code)
            causes = [d for d in done if d[1] != PEER_EXIT]
            if causes:
                failed, code = causes[0]
        if not running:
            if failed is None and done:
                failed, code = done[0]
            return failed, code
        if deadline is not None and time.monotonic() > deadline:
            _stop(procs)
            return failed, code
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every stage still running, SIGKILL what is left after KILL_S."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    end = time.monotonic() + KILL_S
    for p in alive:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _newest_epoch(run_dir: Path) -> int:
    """The epoch of the run folder's newest checkpoint (0: none, or none readable)."""
    try:
        return latest_kind(run_dir)[1]
    except Exception:  # noqa: BLE001 - the stage that reads it reports a damaged one
        return 0


def _resume_hint(run_dir: Path, epoch: int) -> str:
    if not epoch:
        return "no epoch had finished, so there is no checkpoint to resume from"
    return (f"the last checkpoint (epoch {epoch}) is intact: continue with sigprop train "
            f"--resume --run-dir {shlex.quote(str(run_dir))}")
