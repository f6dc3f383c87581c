"""Training throughput of plain backprop, pipelined over S processes with GPipe.

This is the pipeline-parallel *baseline* that sigprop's forward-only stages are
compared against: the same network, split into the same stages, one process per
stage, trained end to end by backprop with ``torch.distributed.pipelining``'s
``ScheduleGPipe``.

How one training step runs (GPipe): the batch is cut into ``microbatches`` equal
microbatches; each microbatch goes forward through all stages (activations sent
from stage s to stage s+1), the last stage computes the one loss (cross-entropy on
the head's output), then each microbatch's backward runs through all stages in
reverse, with the gradients w.r.t. the stage inputs sent back from stage s+1 to
stage s. Gradients are accumulated over the microbatches (scaled by
1/``microbatches``, so they equal the full-batch mean loss's), then every stage
takes its own Adam step (lr 5e-4) over its own parameters. Backprop's pipeline
therefore has a forward fill, a backward drain and a data dependency of every
stage's update on the last stage's loss; sigprop's stages need none of these.

How it is measured: ``len(split)`` worker processes (this file run as a script
with ``sys.executable``), gloo backend on the loopback address, ``threads_per_stage``
intra-op threads each. Every rank builds the network from the same seed and makes
the same fixed synthetic batch ``x ~ N(0, 1)``, ``y ~ U{0..classes-1}`` (so no data
loading is measured). After ``warmup`` steps and a barrier, each rank times
``steps`` steps with ``time.perf_counter`` (up to, not including, a final barrier).
``samples_per_s = batch * steps / max(rank times)``.

Caveat: BatchNorm layers inside blocks normalise over each microbatch
(``batch / microbatches`` samples), not over the whole batch; that is what GPipe
does, and it makes the numerics (not the cost) differ from unpipelined backprop.
Time-major (spiking) networks are refused, since GPipe splits dimension 0.

Use::

    from _gpipe_backprop import gpipe_backprop_samples_per_s
    r = gpipe_backprop_samples_per_s("fc-4x1000", (1, 28, 28), 10, batch=128,
                                     microbatches=4, split=[2, 2], steps=10, warmup=2)
    r["samples_per_s"]
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

LEARNING_RATE = 5e-4
_POLL_S = 0.05
_LOG_TAIL_CHARS = 2000


def gpipe_backprop_samples_per_s(
    network: str,
    input_shape: tuple[int, ...],
    classes: int,
    batch: int,
    microbatches: int,
    split: list[int],
    steps: int,
    warmup: int,
    seed: int = 0,
    threads_per_stage: int = 1,
    timeout_s: float = 300.0,
) -> dict:
    """Train ``network`` by backprop with GPipe over ``len(split)`` processes; time it.

    ``split[s]`` is the number of blocks of stage ``s`` (they must add up to the
    network's block count); the last stage also holds the head. ``batch`` must be a
    multiple of ``microbatches``. Returns ``{"samples_per_s", "step_s",
    "stage_times_s" (each rank's timed wall time, in rank order), "microbatches",
    "split"}``.

    Raises ValueError for bad arguments, and RuntimeError if a worker fails (naming
    its rank and exception) or the run takes longer than ``timeout_s`` seconds; in
    both cases every worker is terminated first, so the caller never hangs.
    """
    split = [int(n) for n in split]
    _check_args(input_shape, classes, batch, microbatches, split, steps, warmup,
                threads_per_stage, timeout_s)
    world = len(split)
    config: dict[str, Any] = {
        "network": network, "input_shape": [int(d) for d in input_shape],
        "classes": int(classes), "batch": int(batch), "microbatches": int(microbatches),
        "split": split, "steps": int(steps), "warmup": int(warmup), "seed": int(seed),
        "threads": int(threads_per_stage), "timeout_s": float(timeout_s),
    }
    with tempfile.TemporaryDirectory(prefix="gpipe_backprop_") as tmp:
        workdir = Path(tmp)
        config["out_dir"] = str(workdir)
        config_path = workdir / "config.json"
        config_path.write_text(json.dumps(config))
        port = _free_port()
        procs: list[subprocess.Popen] = []
        logs = []
        try:
            for rank in range(world):
                env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           RANK=str(rank), WORLD_SIZE=str(world),
                           OMP_NUM_THREADS=str(threads_per_stage),
                           MKL_NUM_THREADS=str(threads_per_stage))
                log = open(workdir / f"rank{rank}.log", "wb")  # noqa: SIM115
                logs.append(log)
                procs.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), str(config_path)],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL))
            _wait_all(procs, workdir, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            for log in logs:
                log.close()
        times = [float(_read_result(workdir, r)["elapsed_s"]) for r in range(world)]
    slowest = max(times)
    return {
        "samples_per_s": batch * steps / slowest,
        "step_s": slowest / steps,
        "stage_times_s": times,
        "microbatches": int(microbatches),
        "split": split,
    }


def _check_args(input_shape: tuple[int, ...], classes: int, batch: int, microbatches: int,
                split: list[int], steps: int, warmup: int, threads: int,
                timeout_s: float) -> None:
    """ValueError naming the first bad argument (checked before any process starts)."""
    if not split or any(n < 1 for n in split):
        raise ValueError(f"split must be a non-empty list of positive block counts per "
                         f"stage, got {split!r}")
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be positive dims, got {input_shape!r}")
    for name, value, low in (("classes", classes, 1), ("batch", batch, 1),
                             ("microbatches", microbatches, 1), ("steps", steps, 1),
                             ("warmup", warmup, 0), ("threads_per_stage", threads, 1)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if batch % microbatches:
        raise ValueError(f"batch ({batch}) must be a multiple of microbatches "
                         f"({microbatches})")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_all(procs: list[subprocess.Popen], workdir: Path, timeout_s: float) -> None:
    """Return once every worker exited cleanly; on the first failure or at the
    deadline, kill the others and raise RuntimeError."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes)
                  if c not in (None, 0) or (c is None and _reported_error(workdir, r))]
        if failed:
            # a failing rank makes its peers fail soon after (closed connections):
            # report the one that failed first, i.e. the first one seen failing.
            for p in procs:
                if p.poll() is None:
                    p.kill()
            rank = failed[0]
            code = procs[rank].poll()
            how = f" (exit code {code})" if code is not None else ""
            raise RuntimeError(f"GPipe backprop worker rank {rank} failed{how}: "
                               f"{_failure_text(workdir, rank)}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise RuntimeError(f"GPipe backprop workers (ranks {running}) did not finish "
                               f"within timeout_s={timeout_s}s; terminated them")
        time.sleep(_POLL_S)


def _reported_error(workdir: Path, rank: int) -> bool:
    """Whether a still-running worker has already written its exception."""
    path = workdir / f"rank{rank}.json"
    return path.exists() and "error" in json.loads(path.read_text())


def _read_result(workdir: Path, rank: int) -> dict:
    path = workdir / f"rank{rank}.json"
    if not path.exists():
        raise RuntimeError(f"GPipe backprop worker rank {rank} exited without a result: "
                           f"{_failure_text(workdir, rank)}")
    return json.loads(path.read_text())


def _failure_text(workdir: Path, rank: int) -> str:
    """The worker's reported exception, else the tail of its output."""
    path = workdir / f"rank{rank}.json"
    if path.exists():
        result = json.loads(path.read_text())
        if "error" in result:
            return f"{result['error']}\n{result.get('traceback', '')}".rstrip()
    log = workdir / f"rank{rank}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[-_LOG_TAIL_CHARS:].strip() or "(no output)"


# ----------------------------------------------------------------------- worker side


def _stage_slices(split: list[int], n_blocks: int) -> list[tuple[int, int]]:
    """[start, end) block indices of every stage."""
    if sum(split) != n_blocks:
        raise ValueError(f"split {split} covers {sum(split)} blocks but the network has "
                         f"{n_blocks}; give block counts per stage that add up to "
                         f"{n_blocks}")
    bounds, start = [], 0
    for n in split:
        bounds.append((start, start + n))
        start += n
    return bounds


def _run_worker(config: dict) -> float:
    """One rank: build its stage, run warmup + timed GPipe steps; return the timed
    wall time in seconds. Expects RANK/WORLD_SIZE/MASTER_* in the environment."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from sigprop.networks import build_network

    from sigprop.engine.perf import tune_allocator

    tune_allocator()  # as every variant of benchmarks/layer_parallel.py
    torch.set_num_threads(config["threads"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    input_shape = tuple(config["input_shape"])
    batch, n_micro = config["batch"], config["microbatches"]
    micro = batch // n_micro

    torch.manual_seed(config["seed"])
    net = build_network(config["network"], input_shape, config["classes"], 0.0)
    if net.time_major:
        raise ValueError(f"{config['network']} is time-major ([T, N, ...] between blocks); "
                         "GPipe splits dimension 0, so it is not supported here")
    start, end = _stage_slices(config["split"], len(net.blocks))[rank]
    first, last = rank == 0, rank == world - 1
    parts = list(net.blocks[start:end]) + ([net.head] if last else [])
    module = nn.Sequential(*parts)
    in_shape = input_shape if first else net.block_shapes[start - 1]
    out_shape = net.output_shape if last else net.block_shapes[end - 1]
    # example microbatch-shaped tensors for every stage make the schedule's shape
    # handling static (no metadata exchange at the first step). Their requires_grad
    # flags are part of that metadata: a later stage's example input must require
    # grad, else the stage neither computes nor sends back its input gradient and
    # the stage before it fails in backward with "Output gradient: None".
    example_in = torch.empty(micro, *in_shape, requires_grad=not first)
    example_out = torch.empty(micro, *out_shape, requires_grad=True)
    stage = PipelineStage(module, rank, world, device=torch.device("cpu"),
                          input_args=example_in, output_args=example_out)
    # every rank passes loss_fn: the schedule runs backward only when it has one
    # (``_has_backward = loss_fn is not None``), though only the last stage calls it
    schedule = ScheduleGPipe(stage, n_microbatches=n_micro, loss_fn=F.cross_entropy)
    optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)

    # the same fixed batch on every rank (same seed, same draw order)
    torch.manual_seed(config["seed"])
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, config["classes"], (batch,))

    def step() -> None:
        args = (x,) if first else ()
        kwargs: dict[str, Any] = {"target": y, "losses": []} if last else {}
        schedule.step(*args, return_outputs=False, **kwargs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(config["warmup"]):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    elapsed = time.perf_counter() - t0
    dist.barrier()
    return elapsed


def _worker_main(config_path: str) -> int:
    """Entry point of a worker process: run, then write rank<R>.json (the timed
    seconds, or the exception) into the parent's directory."""
    import torch.distributed as dist

    config = json.loads(Path(config_path).read_text())
    rank = int(os.environ["RANK"])
    out = Path(config["out_dir"]) / f"rank{rank}.json"
    code = 0
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]),
            timeout=_dt.timedelta(seconds=config["timeout_s"]))
        result: dict[str, Any] = {"rank": rank, "elapsed_s": _run_worker(config)}
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit 1
        result = {"rank": rank, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
        code = 1
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)  # atomic: the parent never reads half a file
    if code:
        # leave at once: tearing down a process group whose peers are blocked or
        # gone can hang, and the parent is waiting for this exit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
