#!/usr/bin/env python
"""Layer-parallel sigprop: S stages in S processes against one process, side by side.

    python benchmarks/layer_parallel.py                          # fc-8x1000, batch 128
    python benchmarks/layer_parallel.py --network vgg8b --input 3x32x32 --steps 3
    python benchmarks/layer_parallel.py --json out.json

What it measures, in one run, interleaved (the order rotates between repeats, since
this machine's speed drifts by +-20% between segments):

* ``single_1thread``: the single-process sigprop rule, one intra-op thread;
* ``single_2thread``: the same with two threads (today's default: the update thread of
  sigprop.rules.sigprop.pipeline where it applies);
* ``stages<S>``: the blocks split into S stages (balanced by each block's measured step
  time, as ``sigprop train --stages`` does by default; ``--split-by counted`` or
  ``--split`` otherwise), one process and ``--stage-threads`` thread(s) each, over gloo on the
  loopback address, with the transport of a real staged run (sigprop.parallel);
* ``gpipe_backprop``: backprop split the same way with torch.distributed.pipelining's
  GPipe schedule (``--microbatches``), one thread per stage (benchmarks/_gpipe_backprop.py);
* ``backprop_2thread``: backprop in one process with two threads, for reference.

Every variant trains on the same synthetic batch (made before timing: no data loading)
from the same initial weights, for ``--warmup`` untimed then ``--steps`` timed steps
per segment; a stage process times its steps between two barriers, and the staged
segment's time is the slowest stage's. Ratios are per repeat (adjacent in time),
summarised by median and range. Each staged segment also reports every stage's compute
time and its time waiting to receive and to send, and the bytes sent per batch: the
inputs of the scaling model in docs/studies/layer-parallel.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.lower().split("x"))


def _build(args, rule_name: str = "sigprop", pipeline: str = "auto"):
    from sigprop.networks import build_network
    from sigprop.rules import build_rule

    torch.manual_seed(args.seed)
    net = build_network(args.network, _shape(args.input), args.classes, 0.0)
    kw = {"head": "classifier", "pipeline": pipeline} if rule_name == "sigprop" else {}
    return build_rule(rule_name, net, args.classes, **kw)


def _batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, *_shape(args.input), generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    return x, y


def time_single(rule, x, y, threads: int, steps: int, warmup: int) -> float:
    """Samples/s of ``rule.train_step`` with ``threads`` intra-op threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            rule.train_step(x, y)
        rule.sync()
        t = time.perf_counter()
        for _ in range(steps):
            rule.train_step(x, y)
        rule.sync()
        return x.shape[0] * steps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(saved)


def choose_split(args, single, n: int) -> dict:
    """Blocks per stage and how they were chosen: ``--split`` as given, else balanced by
    each block's measured step time (a one-block staged step of a throwaway copy of the
    rule, ``--stage-threads`` threads, as a staged run's calibration) or counted cost."""
    from sigprop.parallel.calibrate import time_blocks
    from sigprop.parallel.split import balanced_split, counted_costs, fit_split, stage_ranges

    if args.split is not None:
        sizes, costs, unit, by = fit_split(args.split, single.network), counted_costs(single, n), "GFLOP", "hand"
    elif args.split_by == "counted":
        costs, unit, by = counted_costs(single, n), "GFLOP", "counted"
        sizes = balanced_split(costs, args.stages)
    else:
        saved = torch.get_num_threads()
        try:
            with torch.random.fork_rng():
                torch.set_num_threads(args.stage_threads)
                seconds, _ = time_blocks(_build(args), n, torch.device("cpu"))
        finally:
            torch.set_num_threads(saved)
        costs, unit, by = [1e3 * t for t in seconds], "ms", "measured"
        sizes = balanced_split(costs, args.stages)
    loads = [sum(costs[a:b]) for a, b in stage_ranges(sizes)]
    return {"split": sizes, "by": by, "unit": unit, "block_costs": costs,
            "shares": [v / (sum(loads) or 1.0) for v in loads]}


# --- one stage of the staged segment (run as a child process) -------------------------
def stage_worker(args) -> None:
    import torch.distributed as dist

    from sigprop.parallel.split import resolve_split, stage_ranges
    from sigprop.parallel.transport import Receiver, Sender

    from sigprop.engine.perf import tune_allocator

    tune_allocator()  # as a stage of `sigprop train` does (sigprop.parallel.worker)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.stage_threads)
    dist.init_process_group("gloo", timeout=_dt.timedelta(seconds=300))
    rule = _build(args)
    x, y = _batch(args)
    n = x.shape[0]
    sizes = resolve_split(rule.network, world, args.split, rule.stage_rows(n, True), n)
    a, b = stage_ranges(sizes)[rank]
    rows = n + rule.stage_rows(n, True)
    total = args.warmup + args.steps
    recv = send = None
    if rank > 0:
        recv = Receiver(rank - 1, [(n, rows)] * total, tuple(rule.network.block_shapes[a - 1]),
                        2, x.dtype, x.device)
    if rank < world - 1:
        send = Sender(rank + 1, 2)
    compute = 0.0
    sent_bytes = 0
    t0 = None
    per_step: list[float] = []
    for step in range(total):
        if step == args.warmup:
            if send is not None:
                send.flush()
            rule.sync()
            dist.barrier()
            t0 = time.perf_counter()
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            compute = 0.0
            if recv is not None:
                recv.wait_s = 0.0
            if send is not None:
                send.wait_s = 0.0
        z, yy = (x, y) if recv is None else recv.recv()
        t = time.perf_counter()
        _, _, out = rule.stage_step(z, yy, a, b)
        dt = time.perf_counter() - t
        compute += dt
        if step >= args.warmup:
            per_step.append(dt)
        if out is not None:
            send.send(out, yy)
            sent_bytes = out.numel() * out.element_size() + yy.numel() * 8
    if send is not None:
        send.flush()
    t = time.perf_counter()
    rule.sync()
    compute += time.perf_counter() - t
    elapsed = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    dist.barrier()
    # the process's CPU time (all its threads: gloo's too) against its compute time
    result = {"cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
              "rank": rank, "blocks": [a, b], "elapsed_s": elapsed, "compute_s": compute,
              "wait_recv_s": recv.wait_s if recv else 0.0,
              "wait_send_s": send.wait_s if send else 0.0, "bytes_per_batch": sent_bytes,
              "split": sizes, "median_step_s": statistics.median(per_step),
              "page_faults_per_step":
                  (ru1.ru_minflt - ru0.ru_minflt) / args.steps}
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def time_staged(args, stages: int) -> dict:
    """Spawn ``stages`` stage processes for one segment; their results."""
    from sigprop.parallel.launch import free_port

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(stages), "OMP_NUM_THREADS": str(args.stage_threads)}
        argv = [sys.executable, __file__, "--_stage", "--out-dir", tmp, *args.child_argv]
        procs = [subprocess.Popen(argv, env={**env, "RANK": str(r)}) for r in range(stages)]
        try:
            for p in procs:
                if p.wait(timeout=args.timeout) != 0:
                    raise RuntimeError(f"a stage process exited with code {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(stages)]
    wall = max(r["elapsed_s"] for r in ranks)
    return {"samples_per_s": args.batch_size * args.steps / wall, "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # fc-8x1000: its 2-stage cut is even (4 + 4 blocks of 1000 x 1000; fc-4x1000's first
    # block reads 784 inputs and its last carries the head, so its best cut is 47 / 53)
    p.add_argument("--network", default="fc-8x1000")
    p.add_argument("--input", default="1x28x28")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--split", default=None, help="blocks per stage (default: balanced)")
    p.add_argument("--split-by", default="measured", choices=("measured", "counted"),
                   help="what the balanced split balances: each block's measured step time "
                   "(default, as `sigprop train`) or its counted cost")
    p.add_argument("--stage-threads", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=4, help="GPipe microbatches")
    # 60 steps: an epoch is ~470 batches, so the pipeline fills and drains once in ~470
    # steps; 20-step segments weighed that (one step in 21) ~20x more than training does
    p.add_argument("--steps", type=int, default=60, help="timed steps per segment")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gpipe", action="store_true", help="skip the GPipe backprop baseline")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--_stage", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    if args._stage:
        stage_worker(args)
        return 0
    for flag in ("batch_size", "stages", "stage_threads", "microbatches", "steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or not args.timeout > 0:
        p.error("--warmup must be >= 0 and --timeout > 0")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist")
    # what the stage processes are told: the same network, batch and steps
    args.child_argv = [a for a in raw if a != "--no-gpipe"]
    for flag in ("--json",):
        if flag in args.child_argv:
            i = args.child_argv.index(flag)
            del args.child_argv[i:i + 2]

    from sigprop.engine.perf import tune_allocator
    from sigprop.resources import cpu_capability

    tune_allocator()  # every variant as `sigprop train` runs it (engine/perf.py)
    single = _build(args)
    x, y = _batch(args)
    n = x.shape[0]
    plan = choose_split(args, single, n)
    split = plan["split"]
    # every stage process takes the split decided here
    if "--split" in args.child_argv:
        i = args.child_argv.index("--split")
        del args.child_argv[i:i + 2]
    args.child_argv += ["--split", ",".join(map(str, split))]
    backprop = _build(args, "backprop")
    print(f"CPU kernels: {cpu_capability()}", flush=True)
    print(f"{args.network} on {args.input}, batch {n}, {args.stages} stages {split} "
          f"({args.stage_threads} thread each), {args.steps} steps x {args.repeats} repeats",
          flush=True)
    print(f"  split by {plan['by']}: block costs "
          + ", ".join(f"{c:.3g}" for c in plan["block_costs"]) + f" {plan['unit']}; "
          f"stage shares " + ", ".join(f"{v:.1%}" for v in plan["shares"])
          + f" (even: {1 / args.stages:.1%})", flush=True)
    names = ["single_1thread", "single_2thread", f"stages{args.stages}", "backprop_2thread"]
    if not args.no_gpipe:
        from _gpipe_backprop import gpipe_backprop_samples_per_s
        names.append("gpipe_backprop")
    runs: dict[str, list[float]] = {k: [] for k in names}
    staged_detail = []
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            if name == "single_1thread":
                v = time_single(single, x, y, 1, args.steps, args.warmup)
            elif name == "single_2thread":
                v = time_single(single, x, y, 2, args.steps, args.warmup)
            elif name == "backprop_2thread":
                v = time_single(backprop, x, y, 2, args.steps, args.warmup)
            elif name == "gpipe_backprop":
                v = gpipe_backprop_samples_per_s(
                    args.network, _shape(args.input), args.classes, n, args.microbatches,
                    split, steps=args.steps, warmup=args.warmup, seed=args.seed,
                    threads_per_stage=args.stage_threads)["samples_per_s"]
            else:
                res = time_staged(args, args.stages)
                v = res["samples_per_s"]
                staged_detail.append(res["ranks"])
            runs[name].append(v)
            print(f"  repeat {rep + 1}: {name:<16} {v:9.1f} samples/s", flush=True)
    staged = f"stages{args.stages}"

    def ratio(a: str, b: str) -> dict:
        r = [p / q for p, q in zip(runs[a], runs[b])]
        return {"median": statistics.median(r), "min": min(r), "max": max(r)}

    summary = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {f"{staged}/single_1thread": ratio(staged, "single_1thread"),
              f"{staged}/single_2thread": ratio(staged, "single_2thread"),
              "single_2thread/single_1thread": ratio("single_2thread", "single_1thread"),
              f"{staged}/backprop_2thread": ratio(staged, "backprop_2thread")}
    if "gpipe_backprop" in runs:
        ratios[f"{staged}/gpipe_backprop"] = ratio(staged, "gpipe_backprop")
    # per stage, per batch: compute and waits (medians over the staged segments)
    per_stage = []
    for r in range(args.stages):
        rows = [d[r] for d in staged_detail]
        per_stage.append({
            "blocks": f"{rows[0]['blocks'][0] + 1}-{rows[0]['blocks'][1]}",
            "compute_ms_per_batch": 1e3 * statistics.median(x["compute_s"] for x in rows) / args.steps,
            "cpu_ms_per_batch": 1e3 * statistics.median(x["cpu_s"] for x in rows) / args.steps,
            "wait_recv_ms_per_batch": 1e3 * statistics.median(x["wait_recv_s"] for x in rows) / args.steps,
            "wait_send_ms_per_batch": 1e3 * statistics.median(x["wait_send_s"] for x in rows) / args.steps,
            "bytes_sent_per_batch": rows[0]["bytes_per_batch"]})
    print("median samples/s: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    for k, v in ratios.items():
        print(f"  {k}: {v['median']:.2f} (range {v['min']:.2f}-{v['max']:.2f})")
    for k, s in enumerate(per_stage):
        print(f"  stage {k + 1} (blocks {s['blocks']}): compute {s['compute_ms_per_batch']:.2f} "
              f"ms/batch (CPU {s['cpu_ms_per_batch']:.2f}), waiting to receive {s['wait_recv_ms_per_batch']:.2f}, to send "
              f"{s['wait_send_ms_per_batch']:.2f}; sends {s['bytes_sent_per_batch'] / 1e3:.0f} kB/batch")
    out = {
        "network": args.network, "input": args.input, "batch_size": n, "stages": args.stages,
        "split": split, "split_plan": plan, "stage_threads": args.stage_threads, "steps": args.steps,
        "repeats": args.repeats, "microbatches": args.microbatches,
        f"{staged}_per_s": summary[staged],
        "single_1thread_per_s": summary["single_1thread"],
        "single_2thread_per_s": summary["single_2thread"],
        "backprop_2thread_per_s": summary["backprop_2thread"],
        "gpipe_backprop_per_s": summary.get("gpipe_backprop"),
        "ratios": ratios, "per_stage": per_stage, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "cpu_capability": cpu_capability(), "torch": torch.__version__},
        "date": _dt.date.today().isoformat(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
