"""One stage of a staged (layer-parallel) sigprop run: the loop of one process.

Every process builds the same rule from the run's seed, so every block starts where it
would in one process; stage r then trains only its blocks ``a..b-1`` (with the signal
at the first stage and the classifier head at the last), by :meth:`Sigprop.stage_step`:

    stage 0:   x, y = loader batch k           -> learn blocks, send [h; t], y
    stage r:   [h; t], y = receive batch k     -> learn blocks, send [h; t], y
    last:      [h; t], y = receive batch k     -> learn blocks and the head

Batches flow as a pipeline (while stage 2 learns from batch k, stage 1 learns from
batch k+1), with at most ``DEPTH`` batches in flight between two stages
(:mod:`.transport`). Each block's update reads only what arrived from below, so the
updates are those of the single-process rule on the same batches: equal bit for bit
when both run single-threaded without dropout (tests/test_parallel.py). Dropout masks
come from each stage's own random stream (the first stage's is the single process's).

An epoch ends with every stage's updates applied, evaluation through the same pipeline
(forward only), the exits' sums gathered on rank 0 (all-reduce), the metrics written by
rank 0, and a consistent checkpoint (:mod:`sigprop.engine.runstate`). The progress bar
is the last stage's (its batches are the ones fully learned).

Data-parallel replicas (``--replicas R``): S x R processes, rank ``replica * S + stage``
(under torchrun, one whole pipeline per ``--nproc-per-node S`` machine). Replica j is a
pipeline of its own that learns from rows :func:`.transport.shard` (j) of every batch;
the R processes of a stage form a group in which each step's gradients are all-reduced,
weighted by the replicas' shares of the batch (the gradient of the batch's mean loss
when each shard's BatchNorm statistics are its own), before the stage's one Adam step,
so the replicas of a stage hold the same parameters throughout. At each epoch's end the
group averages its BatchNorm running statistics (and merges its prototypes), checks
that its parameters agree, and replica 0 writes the stage's checkpoint part; evaluation
shares the test batches out the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.loader import derive_seed
from ..engine import runio
from ..engine import runstate as rs
from ..engine.config import Config
from ..engine.runfolder import RunFolder
from ..engine.stagespec import stage_count
from ..engine.trainer import (
    build_config_rule, build_experiment, check_finite, epoch_line, epoch_record,
    resolve_device, set_epoch_lr)
from ..engine.interrupt import one_line
from ..errors import ConfigError, SigpropError, StorageError
from . import replicas
from .split import (
    check_devices, check_staging, describe_plan, fit_split, recorded_plan, settle_plan,
    stage_ranges)
from .stage import StageEnv, release_unowned, stage_threads, timeout_s
from .transport import Receiver, Sender, StageFailure, batch_sizes, peer_lost, shard

DEPTH = 2  # batches in flight between two stages (and receive buffers per stage)
_DROPOUT_STREAM = 7  # derive_seed(seed, _DROPOUT_STREAM, stage[, epoch]): later stages' masks


class StageRun:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool, env: StageEnv,
                 out=None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.env = env
        self.rank = env.rank
        self.world = env.world
        self.out = out
        self.stages = stage_count(cfg.train.stages, cfg.train.split)
        self.replicas = cfg.train.replicas
        self.stage = self.rank % self.stages  # the blocks this process learns
        self.replica = self.rank // self.stages  # the pipeline (share of each batch) it is in
        self.group = None  # this stage's replicas (a process group), with replicas
        self._share = 1.0  # this replica's fraction of the current batch

    # --- setup -----------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=self.out or sys.stdout, flush=True)

    def name(self, rank: int) -> str:
        """A process in messages: "stage 2", or "stage 2 (replica 3)" with replicas."""
        stage = f"stage {rank % self.stages + 1}"
        return stage if self.replicas == 1 else f"{stage} (replica {rank // self.stages + 1})"

    def _agree(self, err: BaseException | None) -> None:
        """Every stage learns whether any failed its setup; the one that did raises its
        own error, the others stop quietly (that stage's message is the one to read)."""
        flag = torch.tensor([0 if err is None else 1 + self.rank], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if err is not None:
            raise err
        if int(flag):
            raise StageFailure(f"{self.name(int(flag) - 1)} failed while setting up (its "
                               "message says why)")

    def _together(self, step, *args) -> None:
        """``step(*args)`` in every process; then every stage learns whether any failed
        (:meth:`_agree`)."""
        err = None
        try:
            step(*args)
        except SigpropError as e:
            err = e
        self._agree(err)

    def run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        want = self.stages * self.replicas
        if self.world != want:
            of = (f"{self.stages} stages" if self.replicas == 1
                  else f"{self.stages} stages x {self.replicas} replicas")
            raise ConfigError(
                f"{self.world} processes were started for a run of {of}; start exactly one "
                f"per stage and replica (torchrun: --nnodes x --nproc-per-node = {want})")
        device = resolve_device(cfg.train.device)
        if device.type == "cuda":
            check_devices(cfg, self.env.local_world)
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            device = torch.device("cuda", local % torch.cuda.device_count())
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s())
        # torchrun keeps its store across --max-restarts: a restarted job's ranks must not
        # read the addresses the previous attempt's (dead) processes left there
        store, rank, world = next(dist.rendezvous("env://", self.rank, self.world,
                                                  timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"sigprop/attempt{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
        try:
            return self._run(device)
        finally:
            dist.destroy_process_group()

    def _setup(self, device: torch.device) -> None:
        cfg = self.cfg
        threads = stage_threads(cfg, self.env.local_world)
        torch.set_num_threads(threads)
        self.threads = threads
        if self.stage == 0:  # the first stage of every replica reads the data
            self.exp = build_experiment(cfg)
            self.rule = self.exp.rule
        else:
            self.exp = None
            self.rule = build_config_rule(cfg, device)
        check_staging(self.rule, cfg)

    def _settle(self, device: torch.device) -> None:
        """The job's one plan (:func:`.split.settle_plan`): sigprop's launcher hands it
        over in ``SIGPROP_STAGE_PLAN``; under torchrun rank 0 settles it (and prints it)
        and broadcasts it. No other process times or balances anything."""
        plan, err = None, None
        if self.env.ours:
            try:
                plan = json.loads(os.environ["SIGPROP_STAGE_PLAN"])
            except (KeyError, ValueError):
                err = ConfigError("a stage started by sigprop's launcher needs the job's "
                                  "split in SIGPROP_STAGE_PLAN (a JSON object)")
        elif self.rank == 0:
            try:
                recorded = recorded_plan(self.run_dir) if self.resume else None
                plan = settle_plan(self.rule, self.cfg, self.threads, device, recorded)
                for line in describe_plan(plan):
                    self._log(line)
            except SigpropError as e:
                err = e
        self._agree(err)
        if not self.env.ours:
            box = [plan]
            dist.broadcast_object_list(box, 0)
            plan = box[0]
        self.plan = plan

    def _place(self) -> None:
        """This stage's blocks, from the plan; the others' parameters released."""
        rule = self.rule
        self.sizes = fit_split(self.plan["split"], rule.network)
        if len(self.sizes) != self.stages:
            raise ConfigError(f"the job's split {self.sizes} has {len(self.sizes)} stages, "
                              f"but {self.stages} were started")
        self.ranges = stage_ranges(self.sizes)
        self.start, self.stop = self.ranges[self.stage]
        release_unowned(rule, self.start, self.stop)
        exits = rule.exit_names
        # this stage's exits: its blocks', and the head's at the last stage
        self.exit_index = list(range(self.start, self.stop))
        if self.stage == self.stages - 1 and len(exits) > len(rule.network.blocks):
            self.exit_index.append(len(exits) - 1)

    def _run(self, device: torch.device) -> list[dict[str, Any]]:
        cfg = self.cfg
        self._together(self._setup, device)
        self._settle(device)
        self._together(self._place)
        rule = self.rule
        if self.replicas > 1:
            # every process creates every stage's group, in the same order
            for r in range(self.stages):
                group = dist.new_group([j * self.stages + r for j in range(self.replicas)])
                if r == self.stage:
                    self.group = group
            rule.grad_reduce = self._reduce_grads
        # how many samples the epochs hold (only the first stage reads the data)
        counts = torch.zeros(3, dtype=torch.int64)
        if self.rank == 0:
            counts[:] = torch.tensor([self.exp.train.num_samples, int(self.exp.train.drop_last),
                                      self.exp.test.num_samples])
        dist.broadcast(counts, 0)
        n_train, drop_last, n_test = (int(v) for v in counts)
        self.train_sizes = batch_sizes(n_train, cfg.data.batch_size, bool(drop_last))
        self.test_sizes = batch_sizes(n_test, cfg.data.eval_batch_size, False)
        self._agree(replicas.check_shards(self.replicas, self.train_sizes, self.test_sizes)
                    if self.rank == 0 else None)
        history, start = self._restore()
        if self.rank == 0:
            blocks = ", ".join(f"stage {k + 1}: blocks {a + 1}-{b}" if b - a > 1
                               else f"stage {k + 1}: block {a + 1}"
                               for k, (a, b) in enumerate(self.ranges))
            copies = f" x {self.replicas} replicas" if self.replicas > 1 else ""
            where = f"{self.stages} stage{'s' if self.stages > 1 else ''}{copies}"
            self._log(f"{cfg.rule.name} in {where} ({blocks}; "
                      f"{dist.get_backend()}, {self.threads} thread(s) each on rank 0)")
            self._log(f"{cfg.rule.name} step: {rule.step_kind}")
        if start == 0:  # dropout streams: the first stage's is the single process's
            torch.manual_seed(cfg.train.seed + 1 if self.rank == 0
                              else derive_seed(cfg.train.seed, _DROPOUT_STREAM, self.rank))
        for epoch in range(start, cfg.train.epochs):
            record = self._epoch(epoch, device)
            if self.rank == 0:
                history.append(record)
            self._checkpoint(epoch + 1, history)
            self._log(epoch_line(record, cfg.train.epochs))
            if self.rank == 0:
                shares = [v["share"] for v in record["stages"].values()]
                self._log(f"  stages' shares of this epoch's compute: "
                          f"{' / '.join(f'{v:.2f}' for v in shares)}, balance "
                          f"{max(shares):.2f} (planned {self.plan['balance']:.2f})")
        return history

    def _shares(self, sizes: list[int]) -> list[tuple[int, int]]:
        """This replica's rows (lo, hi) of each batch of ``sizes``."""
        return [shard(n, self.replicas, self.replica) for n in sizes]

    def _reduce_grads(self, grads: list[torch.Tensor]) -> None:
        replicas.reduce_grads(grads, self._share, self.group)

    def _sync_replicas(self) -> None:
        if self.replicas > 1:
            replicas.sync_stage(self.rule, self.stage, self.stages, self.start, self.stop,
                                self.group, self.replicas)

    # --- resume ---------------------------------------------------------------------
    def _restore(self) -> tuple[list[dict[str, Any]], int]:
        """Load the run's newest checkpoint into this stage; (history, epochs done).
        Rank 0 checks the folder (:class:`.runstate.RunStart`), then tells the others
        what to load: kind 0 nothing, 1 the whole single-process
        checkpoint, 2 this stage's own file (same split), 3 every stage file merged
        (another split). Rank 0 reuses what it read to decide, and writes config.json once
        every stage has loaded its part."""
        decision = torch.zeros(2, dtype=torch.int64)
        err = None
        history: list[dict[str, Any]] = []
        state = None  # rank 0: the checkpoint (kind 1) or its own stage file (kind 2)
        if self.rank == 0:
            try:
                start = rs.RunStart(self.run_dir, self.cfg, self.resume, merged=False)
                history = start.prepare(self._log, {"precision": self.rule.precision(
                    next(self.rule.modules.parameters()).device),
                    "stage_plan": self.plan})  # written once all loaded
                if start.kind == "staged":
                    kind = 2 if start.split == self.sizes else 3
                else:
                    kind = 1 if start.kind == "single" else 0
                decision[:] = torch.tensor((kind, start.epoch))
                state = start.state if kind in (1, 2) else None
            except SigpropError as e:
                err = e
        self._agree(err)
        dist.broadcast(decision, 0)
        kind, epoch = (int(v) for v in decision)
        err = None
        try:
            if kind == 1:
                state = state or runio.load_checkpoint(self.run_dir / runio.CHECKPOINT, "cpu")
            elif kind == 2:
                index = {"epoch": epoch, "split": self.sizes,
                         "files": [rs.stage_file(epoch, r, self.stages)
                                   for r in range(self.stages)]}
                state = state or rs.load_stage_file(self.run_dir, index, self.stage)
            elif kind == 3:
                state = rs.load_run_state(self.run_dir)
            if kind:
                rs.load_stage_part(self.rule, state["rule"], self.stage, self.ranges)
                self._set_rng(state["rng"], epoch, own=kind == 2)
        except SigpropError as e:
            err = e
        self._agree(err)
        if self.rank == 0:
            start.write()
            if kind:
                self._log(f"resuming {self.run_dir} after epoch {epoch}")
        return history, epoch

    def _set_rng(self, saved: torch.Tensor, epoch: int, own: bool) -> None:
        """The dropout stream: this stage's own saved state, else (the checkpoint came from
        another split) the saved one at the first stage and a fresh one elsewhere (and at
        every replica but the first: its masks are its own)."""
        if (own and self.replica == 0) or self.rank == 0:
            torch.set_rng_state(saved.cpu())
        else:
            torch.manual_seed(derive_seed(self.cfg.train.seed, _DROPOUT_STREAM, self.rank, epoch))

    # --- an epoch -------------------------------------------------------------------
    def _epoch(self, epoch: int, device: torch.device) -> dict[str, Any]:
        cfg, rule = self.cfg, self.rule
        first, last = self.stage == 0, self.stage == self.stages - 1
        lr = set_epoch_lr(rule, cfg, epoch)
        n_exits = len(rule.exit_names)
        mine = self.exit_index
        k = len(mine)
        row_shape = tuple(rule.network.block_shapes[self.start - 1]) if not first else ()
        train_rows, test_rows = self._shares(self.train_sizes), self._shares(self.test_sizes)
        messages = ([(b - a, b - a + rule.stage_rows(b - a, True)) for a, b in train_rows]
                    + [(b - a, b - a + rule.stage_rows(b - a, False)) for a, b in test_rows])
        dtype = next(rule.network.parameters()).dtype
        recv = None if first else Receiver(self.rank - 1, messages, row_shape, DEPTH, dtype,
                                           device, name=self.name(self.rank - 1))
        send = None if last else Sender(self.rank + 1, DEPTH, name=self.name(self.rank + 1))
        every = cfg.train.check_every
        steps = len(self.train_sizes)
        loss_sum = torch.zeros(k, device=device, dtype=torch.float64)
        correct_sum = torch.zeros(k, device=device, dtype=torch.int64)
        window = torch.zeros(min(every, max(steps, 1)), k, device=device)
        seen = 0
        rule.set_training(True)
        batches = self.exp.train.epoch(epoch) if first else None
        dist.barrier()  # every stage starts the epoch together: one clock for its time
        start = time.perf_counter()
        compute = 0.0
        with tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch",
                  disable=not (cfg.train.progress and last and self.replica == 0),
                  leave=False, file=sys.stderr) as bar:
            for step in range(steps):
                if first:
                    z, y = next(batches)
                    a, b = train_rows[step]
                    if b - a < y.shape[0]:  # this replica's share of the batch
                        z, y = z[a:b], y[a:b]
                else:
                    z, y = recv.recv()
                self._share = y.shape[0] / self.train_sizes[step]
                t = time.perf_counter()
                losses, correct, out = rule.stage_step(z, y, self.start, self.stop)
                compute += time.perf_counter() - t
                if out is not None:
                    send.send(out, y)
                window[step % every] = losses
                loss_sum += losses * y.shape[0]
                correct_sum += correct
                seen += y.shape[0]
                if (step + 1) % every == 0 or step + 1 == steps:
                    check_finite(window[: step % every + 1],
                                 [rule.exit_names[i] for i in mine], epoch, step)
                    if last:
                        bar.update(step % every + 1)
                        bar.set_postfix(loss=f"{float(loss_sum[-1]) / seen:.4f}",
                                        acc=f"{int(correct_sum[-1]) / seen:.4f}")
            t = time.perf_counter()
            rule.sync()
            compute += time.perf_counter() - t
        elapsed = time.perf_counter() - start
        waits = (recv.wait_s if recv else 0.0, send.wait_s if send else 0.0)
        self._sync_replicas()
        test_correct = self._evaluate(recv, send, device, test_rows)
        if send is not None:
            send.flush()
        # every exit's sums on every rank (each stage fills its own), then rank 0 reports
        sums = torch.zeros(3 * n_exits + 1, dtype=torch.float64)
        sums[mine] = loss_sum.cpu()
        sums[[n_exits + i for i in mine]] = correct_sum.cpu().double()
        sums[[2 * n_exits + i for i in mine]] = test_correct.cpu().double()
        if last:
            sums[-1] = seen
        dist.all_reduce(sums)
        timing = torch.zeros(self.world, 4, dtype=torch.float64)
        timing[self.rank] = torch.tensor([elapsed, compute, *waits], dtype=torch.float64)
        dist.all_reduce(timing)
        seen = int(sums[-1])
        train_loss = (sums[:n_exits] / seen).tolist()
        train_acc = (sums[n_exits:2 * n_exits] / seen).tolist()
        test_acc = (sums[2 * n_exits:3 * n_exits] / sum(self.test_sizes)).tolist()
        # per stage, the slowest of its replicas
        per = timing.view(self.replicas, self.stages, 4).amax(0)
        total = float(per[:, 1].sum()) or 1.0
        stages = {f"stage{r + 1}": {
            "blocks": f"{a + 1}-{b}" if b - a > 1 else f"{b}", "compute_s": float(per[r, 1]),
            "share": round(float(per[r, 1]) / total, 4),
            "wait_recv_s": float(per[r, 2]), "wait_send_s": float(per[r, 3])}
            for r, (a, b) in enumerate(self.ranges)}
        if self.replicas > 1:
            for entry in stages.values():
                entry["replicas"] = self.replicas
        record = epoch_record(rule, epoch, lr, train_loss, train_acc, test_acc,
                              float(timing[:, 0].max()), seen)
        return {**record, "stages": stages}

    def _evaluate(self, recv: Receiver | None, send: Sender | None, device: torch.device,
                  rows: list[tuple[int, int]]) -> torch.Tensor:
        """This stage's exits' correct counts over (this replica's share of) the test set,
        through the pipeline."""
        rule = self.rule
        rule.set_training(False)
        correct = torch.zeros(len(self.exit_index), dtype=torch.int64, device=device)
        batches = self.exp.test.epoch(0) if recv is None else None
        for a, b in rows:
            if recv is None:
                z, y = next(batches)
                if b - a < y.shape[0]:
                    z, y = z[a:b], y[a:b]
            else:
                z, y = recv.recv()
            scores, out = rule.stage_scores(z, b - a, self.start, self.stop)
            if out is not None:
                send.send(out, y)
            correct += torch.stack([(s.argmax(1) == y).sum() for s in scores])
        return correct

    # --- checkpoint -----------------------------------------------------------------
    def _checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """Every stage writes its part (its first replica: the others hold the same);
        when all have, rank 0 points stages.json at them; then each stage removes its
        older part (module docstring of sigprop.engine.runstate)."""
        own = rs.stage_file(epoch, self.stage, self.stages)
        writer = self.replica == 0
        if writer:
            rs.save_stage(self.run_dir, epoch, self.stage, self.stages, {
                "epoch": epoch, "config": self.cfg.to_dict(), "stage": self.stage,
                "split": self.sizes,
                "rule": rs.stage_state(self.rule.state_dict(), self.stage, self.ranges),
                "rng": torch.get_rng_state(), "history": history if self.rank == 0 else []})
        dist.barrier()
        if self.rank == 0:
            rs.write_stages(self.run_dir, epoch, self.sizes)
            runio.write_metrics(self.run_dir, history)
        dist.barrier()
        if writer:
            rs.remove_stale(self.run_dir, {own}, self.stage, self.stages)


def run_stage(cfg: Config, run_dir: Path, resume: bool) -> list[dict[str, Any]]:
    """This process's stage of the run (torchrun or sigprop's launcher started it).
    Rank 0 holds the run folder unless the launcher does; a StageFailure (a neighbour
    stopped) and every other error name this stage."""
    env = StageEnv()
    folder = None
    stages = stage_count(cfg.train.stages, cfg.train.split)
    who = f"stage {env.rank % stages + 1}/{stages}"
    if cfg.train.replicas > 1:
        who += f" (replica {env.rank // stages + 1}/{cfg.train.replicas})"
    try:
        if env.rank == 0 and not env.ours:
            folder = RunFolder.acquire(run_dir)
        else:
            Path(run_dir).mkdir(parents=True, exist_ok=True)  # each machine's own stage files
        return StageRun(cfg, run_dir, resume, env).run()
    except StorageError as err:  # a full disk, a read-only folder, ...
        again = f"sigprop train --resume --run-dir {shlex.quote(str(run_dir))}"
        raise StorageError(
            f"{who}: {one_line(err)}; the last checkpoint every stage finished, if any, is "
            f"intact (stages.json points at it); make room, then continue with: {again}"
        ) from None
    except SigpropError as err:
        raise type(err)(f"{who}: {one_line(err)}") from None
    except RuntimeError as err:  # a collective (barrier, all-reduce) lost a peer
        cause = peer_lost(err)
        if cause is None:
            raise
        raise StageFailure(f"{who}: another stage stopped: {cause}") from None
    finally:
        if folder is not None:
            folder.release()


__all__ = ["run_stage"]
