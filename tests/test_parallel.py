"""Layer-parallel training (sigprop.parallel): splits, stage steps against the
single-process rule, checkpoints between staged and single runs, and whole staged runs
in separate processes on the loopback address (each bounded in time)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import random_batches, sigprop_rule
from sigprop.engine import runstate as ck
from sigprop.engine.stagespec import parse_split
from sigprop.errors import ConfigError, InputError
from sigprop.parallel.split import balanced_split, describe_plan, resolve_split, stage_ranges

REAL = Path("/usr/share/datasets/fashion-mnist")
TIMEOUT = 240  # no staged run in this file may take longer (s)


# --- splits ---------------------------------------------------------------------------
def _brute_force(costs, stages, last_extra=0.0):
    best = None
    n = len(costs)
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[-1] += last_extra
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if best is None or max(loads) < best[0]:
            best = (max(loads), sizes)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_minimises_the_slowest_stage(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 9, (1,), generator=g))
    costs = (torch.rand(n, generator=g) * 10).tolist()
    extra = float(torch.rand(1, generator=g)) * 5
    for stages in range(1, n + 1):
        sizes = balanced_split(costs, stages, last_extra=extra)
        assert len(sizes) == stages and sum(sizes) == n and min(sizes) >= 1
        bounds = [0, *itertools.accumulate(sizes)]
        loads = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[-1] += extra
        assert max(loads) == pytest.approx(_brute_force(costs, stages, extra)[0])


def test_split_of_real_networks_is_balanced_by_counted_cost():
    from sigprop.networks import build_network

    net = build_network("fc-4x1000", (1, 28, 28), 10, 0.0)
    assert resolve_split(net, 2, None, 10, 128) == [2, 2]
    assert resolve_split(net, 4, None, 10, 128) == [1, 1, 1, 1]
    assert resolve_split(net, 2, "3,1", 10, 128) == [3, 1]
    assert stage_ranges([2, 1, 1]) == [(0, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("split, match", [
    ("2,x", "positive integers"), ("0,3", "no block"), ("3", "one stage"), ("", "positive"),
])
def test_bad_split_text(split, match):
    with pytest.raises(ConfigError, match=match):
        parse_split(split)


def test_split_must_fit_the_network():
    from sigprop.networks import build_network

    net = build_network("fc-3x16", (1, 28, 28), 10, 0.0)
    with pytest.raises(ConfigError, match="covers 4 blocks but the network has 3"):
        resolve_split(net, 2, "2,2", 10, 64)
    with pytest.raises(ConfigError, match="4 stages but the network has 3 blocks"):
        resolve_split(net, 4, None, 10, 64)


# --- the split by measured cost: decided once, recorded, kept -------------------------
def test_time_blocks_takes_the_median_of_passes_in_rotating_order():
    """Each block's one-block staged step is timed (a mocked clock: no real timing);
    the passes visit the blocks in a rotating order, and one slow pass does not move
    a block's cost (the median)."""
    from sigprop.parallel.calibrate import MIN_REPEATS, time_blocks

    rule = sigprop_rule(head="classifier", pipeline="off")
    cost, now, calls = [3.0, 1.0, 2.0], [0.0], []
    real = rule.stage_step

    def step(z, y, a, b):
        assert b == a + 1 and y.shape == (16,)
        out = real(z, y, a, b)
        calls.append(a)
        now[0] += cost[a] * (50.0 if len(calls) == 5 else 1.0)  # one slow step
        return out

    rule.stage_step = step
    seconds, repeats = time_blocks(rule, 16, torch.device("cpu"), clock=lambda: now[0])
    assert repeats == MIN_REPEATS  # the first pass (6 s) leaves no budget for more
    assert seconds == cost
    assert calls == [0, 1, 2, 0, 1, 2, 1, 2, 0, 2, 0, 1]
    now[0], calls[:] = 0.0, []
    cost[:] = [1e-4, 1e-4, 1e-4]
    assert time_blocks(rule, 16, torch.device("cpu"), clock=lambda: now[0])[1] == 9


def _staged_cfg(**train):
    from sigprop.engine.config import Config, apply_overrides

    return apply_overrides(Config(), {"model": {"network": "fc-3x32"},
                                      "data": {"batch_size": 64}, "train": train})


def _settle(cfg, monkeypatch, measured=None, recorded=None):
    """settle_plan with the calibration replaced: ``measured`` (ms per block), an
    exception to raise, or None (the calibration must not run)."""
    from sigprop.engine.trainer import build_config_rule
    from sigprop.parallel import calibrate
    from sigprop.parallel.split import settle_plan

    def measure(cfg, threads, device):
        if measured is None:
            raise AssertionError("the calibration ran")
        if isinstance(measured, BaseException):
            raise measured
        return list(measured), {"batch": 64, "threads": threads, "device": str(device),
                                "repeats": 5}

    monkeypatch.setattr(calibrate, "measure_split_costs", measure)
    rule = build_config_rule(cfg, torch.device("cpu"))
    return settle_plan(rule, cfg, 1, torch.device("cpu"), recorded)


def test_uneven_measured_costs_move_the_split_and_the_plan_says_so(monkeypatch):
    cfg = _staged_cfg(stages=2)
    heavy_last = _settle(cfg, monkeypatch, [1.0, 1.0, 10.0])
    heavy_first = _settle(cfg, monkeypatch, [10.0, 1.0, 1.0])
    assert heavy_last["split"] == [2, 1] and heavy_first["split"] == [1, 2]
    assert heavy_last["by"] == "measured" and heavy_last["unit"] == "ms"
    assert heavy_last["block_costs"] == [1.0, 1.0, 10.0]
    assert heavy_last["shares"] == pytest.approx([2 / 12, 10 / 12], abs=1e-4)
    assert heavy_last["balance"] == max(heavy_last["shares"])
    assert heavy_last["calibration"]["repeats"] == 5
    line, = describe_plan(heavy_last)
    assert line.startswith("split 2,1 by measured step time") and "balance 0.83" in line
    # the counted cost, asked for: no calibration, the counted split
    counted = _settle(_staged_cfg(stages=2, split_by="counted"), monkeypatch)
    assert counted["by"] == "counted" and counted["split"] == [1, 2] and "fallback" not in counted
    # where timing cannot run: the counted cost, and one line that says so
    failed = _settle(cfg, monkeypatch, RuntimeError("out of memory\nwhile timing"))
    assert failed["by"] == "counted" and failed["split"] == counted["split"]
    note, line = describe_plan(failed)
    assert note == ("note: timing the blocks failed (out of memory while timing); the split "
                    "falls back to the counted cost")
    assert line.startswith("split 1,2 by counted cost")
    # by hand: that split, never timed
    hand = _settle(_staged_cfg(split="2,1"), monkeypatch)
    assert hand["split"] == [2, 1] and hand["by"] == "hand"
    assert describe_plan(hand)[0].startswith("split 2,1 given by hand (no calibration)")
    json.dumps([heavy_last, failed, hand])  # what config.json and the stages receive


def test_a_resume_keeps_its_recorded_split(monkeypatch):
    cfg = _staged_cfg(stages=2)
    recorded = _settle(cfg, monkeypatch, [1.0, 1.0, 10.0])
    kept = _settle(cfg, monkeypatch, None, recorded=recorded)  # timing would move it
    assert kept == {**recorded, "kept": True}
    assert "kept from the run's record" in describe_plan(kept)[0]
    # another number of stages, or the other --split-by: settled afresh
    assert _settle(_staged_cfg(stages=3), monkeypatch, [1.0, 1.0, 10.0],
                   recorded=recorded)["split"] == [1, 1, 1]
    assert _settle(_staged_cfg(stages=2, split_by="counted"), monkeypatch,
                   recorded=recorded)["by"] == "counted"
    # a damaged record: settled afresh (here: timed again)
    damaged = {k: v for k, v in recorded.items() if k != "block_costs"}
    again = _settle(cfg, monkeypatch, [10.0, 1.0, 1.0], recorded=damaged)
    assert again["split"] == [1, 2] and "kept" not in again


def test_every_stage_runs_the_launchers_one_split_and_a_resume_keeps_it(
        fake_fashion, tmp_path, monkeypatch, capfd):
    """The launcher calibrates (here: injected costs that the counted cost and the
    stages' own view would not give), prints and records the plan; every stage
    process trains the split it was handed; a resume keeps it without timing again;
    --split by hand never times."""
    from sigprop.cli import main
    from sigprop.parallel import calibrate

    run = tmp_path / "run"
    common = ["--data-dir", str(fake_fashion), "--run-dir", str(run), "--network", "fc-3x32",
              "--batch-size", "64", "--eval-batch-size", "100", "--no-progress",
              "--pipeline", "off", "--stage-threads", "1"]
    _settle(_staged_cfg(stages=2), monkeypatch, [1.0, 1.0, 10.0])  # installs the mock
    assert main(["train", *common, "--stages", "2", "--epochs", "1"]) == 0
    out = capfd.readouterr().out
    assert "split 2,1 by measured step time (blocks 1 / 1 / 10 ms" in out
    assert "stage 1: blocks 1-2, stage 2: block 3" in out

    def splits():
        index = ck.read_stages(run)
        parts = [ck.load_stage_file(run, index, r)["split"] for r in range(2)]
        plan = json.loads((run / "config.json").read_text())["stage_plan"]
        return index["split"], parts, plan

    index, parts, plan = splits()
    assert index == [2, 1] and parts == [[2, 1], [2, 1]] and plan["split"] == [2, 1]
    assert plan["by"] == "measured" and plan["balance"] == pytest.approx(10 / 12, abs=1e-4)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert sum(s["share"] for s in record["stages"].values()) == pytest.approx(1, abs=1e-3)
    # resumed: the recorded split, no calibration (the mock now refuses to run)
    monkeypatch.setattr(calibrate, "measure_split_costs", lambda *a: pytest.fail("timed"))
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2",
                 "--no-progress"]) == 0
    assert "split 2,1 kept from the run's record" in capfd.readouterr().out
    index, parts, plan = splits()
    assert index == [2, 1] and parts == [[2, 1], [2, 1]] and plan["kept"]
    # by hand: never timed
    hand = tmp_path / "hand"
    common[common.index(str(run))] = str(hand)
    assert main(["train", *common, "--split", "1,2", "--epochs", "1"]) == 0
    assert "split 1,2 given by hand" in capfd.readouterr().out
    assert json.loads((hand / "config.json").read_text())["stage_plan"]["by"] == "hand"


# --- stage steps in one process: the same updates ---------------------------------------
def _params(rule):
    return {k: v.clone() for k, v in rule.modules.state_dict().items()}


@pytest.mark.parametrize("signal_name", ["label", "label-input"])
@pytest.mark.parametrize("fast_path", ["auto", "off"])
@pytest.mark.parametrize("split", [[2, 1], [1, 1, 1]])
def test_stage_steps_equal_the_single_process_rule(signal_name, fast_path, split):
    """Blocks trained in ranges, rows handed on, equal the whole step bit for bit
    (single-threaded): parameters, prototypes, Adam states, losses and exits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(signal=signal_name, head="classifier", fast_path=fast_path, pipeline="off")
        whole = sigprop_rule(**kw)
        parts = [sigprop_rule(**kw) for _ in split]
        ranges = stage_ranges(split)
        for x, y in random_batches(k=4):
            ref_losses, ref_correct = whole.train_step(x, y)
            z, losses = x, []
            for rule, (a, b) in zip(parts, ranges):
                got, _, z = rule.stage_step(z if a == 0 else z.clone(), y, a, b)
                losses.append(got)
            assert z is None
            assert torch.equal(torch.cat(losses), ref_losses)
        merged = ck.merge_states([ck.stage_state(r.state_dict(), k, ranges)
                                  for k, r in enumerate(parts)])
        want = whole.state_dict()
        assert merged["modules"].keys() == want["modules"].keys()
        for key, v in want["modules"].items():
            assert torch.equal(merged["modules"][key], v), key
        for a, b in zip(merged["optimizers"], want["optimizers"]):
            assert a["state"].keys() == b["state"].keys()
            for i in a["state"]:
                for name, t in b["state"][i].items():
                    assert torch.equal(a["state"][i][name], t)
        # evaluation through the stages: every exit's scores as exit_scores gives them
        x = torch.randn(17, 1, 6, 6)
        for r in (whole, *parts):
            r.set_training(False)
        ref = whole.exit_scores(x)
        scores, z = [], x
        for rule, (a, b) in zip(parts, ranges):
            got, z = rule.stage_scores(z, 17, a, b)
            scores += got
        assert len(scores) == len(ref)
        for s, r in zip(scores, ref):
            assert torch.equal(s, r)
    finally:
        torch.set_num_threads(saved)


def test_stage_step_checks_what_it_receives():
    rule = sigprop_rule(head="classifier")
    x, y = random_batches(k=1)[0]
    _, _, z = rule.stage_step(x, y, 0, 1)
    with pytest.raises(InputError, match="stacked rows of shape"):
        rule.stage_step(z[:-1], y, 1, 3)
    with pytest.raises(InputError, match="not a range"):
        rule.stage_step(z, y, 2, 1)


def test_loop_back_signals_are_refused_in_stages():
    rule = sigprop_rule(signal="loop-pred", head="classifier")
    assert "Eq. 11/12" in rule.staging_unsupported()
    x, y = random_batches(k=1)[0]
    with pytest.raises(ConfigError, match="staged training"):
        rule.stage_step(x, y, 0, 1)


def test_state_parts_name_each_entry_once():
    rule = sigprop_rule(head="classifier")
    x, y = random_batches(k=1)[0]
    rule.train_step(x, y)
    ranges = stage_ranges([1, 2])
    parts = [ck.stage_state(rule.state_dict(), k, ranges) for k in range(2)]
    a, b = (set(p["modules"]) for p in parts)
    assert not a & b and a | b == set(rule.state_dict()["modules"])
    assert any(k.startswith("signal.") for k in a) and any(k.startswith("network.head.") for k in b)


# --- whole staged runs in processes -------------------------------------------------------
def _sigprop(*args, env=None, timeout=TIMEOUT):
    """`sigprop ...` in a subprocess (one thread per process), bounded in time."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sigprop", *map(str, args)], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _train(data_dir, run_dir, *extra, epochs=2):
    # --pipeline is sigprop's option: left out when another rule is named
    pipeline = () if "--rule" in extra else ("--pipeline", "off")
    return _sigprop("train", "--data-dir", data_dir, "--run-dir", run_dir, "--network",
                    "fc-3x32", "--batch-size", 64, "--eval-batch-size", 100, "--epochs",
                    epochs, "--no-progress", *pipeline, "--stage-threads", 1, *extra)


def _final_state(run_dir):
    return ck.load_run_state(run_dir)


def test_staged_runs_equal_the_single_process_run(fake_fashion, tmp_path):
    """S = 2 and S = 3 (the launcher's processes, gloo) end with the single-process
    run's parameters bit for bit, and the same accuracies."""
    single = _train(fake_fashion, tmp_path / "single")
    assert single.returncode == 0, single.stderr
    ref = _final_state(tmp_path / "single")
    for name, flags in (("s2", ["--stages", 2]), ("s3", ["--split", "1,1,1"])):
        run = _train(fake_fashion, tmp_path / name, *flags)
        assert run.returncode == 0, run.stderr
        assert "in 2 stages" in run.stdout or "in 3 stages" in run.stdout
        got = _final_state(tmp_path / name)
        assert got["rule"]["modules"].keys() == ref["rule"]["modules"].keys()
        for key, v in ref["rule"]["modules"].items():
            assert torch.equal(got["rule"]["modules"][key], v), (name, key)
        for a, b in zip(got["history"], ref["history"]):
            assert a["test_acc_exits"] == b["test_acc_exits"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert "stages" in got["history"][-1] and "stage1" in got["history"][-1]["stages"]


def test_a_staged_checkpoint_evaluates_and_resumes_in_one_process_and_back(
        fake_fashion, tmp_path):
    run = tmp_path / "run"
    first = _train(fake_fashion, run, "--stages", 2, epochs=1)
    assert first.returncode == 0, first.stderr
    staged_acc = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_acc"]
    ev = _sigprop("eval", run, "--data-dir", fake_fashion)
    assert ev.returncode == 0, ev.stderr
    assert f"test accuracy: {staged_acc:.4f}" in ev.stdout
    single = _sigprop("train", "--resume", "--run-dir", run, "--stages", 1, "--epochs", 2,
                      "--no-progress")
    assert single.returncode == 0, single.stderr
    assert (run / "checkpoint.pt").exists()
    back = _sigprop("train", "--resume", "--run-dir", run, "--split", "2,1", "--epochs", 3,
                    "--no-progress")
    assert back.returncode == 0, back.stderr
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert "stages" in history[0] and "stages" not in history[1] and "stages" in history[2]
    assert ck.read_stages(run)["epoch"] == 3


@pytest.mark.parametrize("flags, match", [
    (["--split", "2,2"], "covers 4 blocks but the network has 3"),
    (["--stages", 4], "4 stages but the network has 3 blocks"),
    (["--stages", 2, "--signal", "loop-pred", "--head", "classifier"], "Eq. 11/12"),
    (["--stages", 2, "--rule", "backprop"], "not split into stages"),
    (["--stages", 2, "--split-by", "timed"], "train.split_by must be measured or counted"),
])
def test_bad_stage_settings_stop_before_anything_starts(fake_fashion, tmp_path, flags, match):
    run = tmp_path / "run"
    res = _train(fake_fashion, run, *flags)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not run.exists()


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK="))


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not installed")
def test_a_killed_stage_ends_the_job_and_resume_continues(tmp_path):
    """SIGKILL the last stage mid-epoch: every process ends within the bound, the
    launcher names the stage, the last consistent checkpoint is intact, resume goes on."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "sigprop", "train", "--data-dir", REAL, "--run-dir", run,
            "--network", "fc-3x256", "--train-limit", 6000, "--test-limit", 500,
            "--epochs", 30, "--no-progress", "--stages", 2, "--stage-threads", 1]
    launcher = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / ck.STAGES_FILE).exists():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
            time.sleep(0.1)
        time.sleep(0.3)  # into epoch 2
        stages = {_rank_of(p): p for p in _children(launcher.pid)}
        assert sorted(stages) == [0, 1]
        os.kill(stages[1], signal.SIGKILL)
        killed = time.monotonic()
        out, err = launcher.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert took < 30, took
    assert launcher.returncode == 2
    assert "stage 2/2 (blocks" in err and "SIGKILL" in err and "--resume" in err, err
    assert not any(Path(f"/proc/{p}").exists() for p in stages.values())
    done = ck.read_stages(run)["epoch"]
    assert 1 <= done < 30
    state = ck.load_run_state(run)  # the parts of one epoch, readable
    assert state["epoch"] == done and len(state["history"]) == done
    res = _sigprop("train", "--resume", "--run-dir", run, "--no-progress", "--epochs", done + 1)
    assert res.returncode == 0, res.stderr
    assert f"resuming {run} after epoch {done}" in res.stdout
    assert ck.read_stages(run)["epoch"] == done + 1
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, done + 2))


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not installed")
def test_two_stages_learn_fashion_mnist_as_one_process(tmp_path):
    """A 2-stage run on a real Fashion-MNIST slice reaches the single-process accuracy
    (here: the same, to the sample; and well above chance); so do two replicas."""
    common = ["--data-dir", REAL, "--network", "fc-2x128", "--train-limit", 3000,
              "--test-limit", 1000, "--epochs", 1, "--no-progress", "--pipeline", "off"]
    one = _sigprop("train", "--run-dir", tmp_path / "one", *common)
    two = _sigprop("train", "--run-dir", tmp_path / "two", "--stages", 2,
                   "--stage-threads", 1, *common)
    # two replicas of one stage: each learns from half of every batch (its own BatchNorm
    # statistics), so close to the one-process accuracy rather than equal to it
    dp = _sigprop("train", "--run-dir", tmp_path / "dp", "--replicas", 2,
                  "--stage-threads", 1, *common)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert dp.returncode == 0, dp.stderr
    acc = [json.loads((tmp_path / d / "metrics.jsonl").read_text())["test_acc"]
           for d in ("one", "two", "dp")]
    assert acc[0] > 0.7 and acc[1] == acc[0], acc
    assert abs(acc[2] - acc[0]) < 0.03, acc


def test_torchrun_runs_the_same_program(fake_fashion, tmp_path):
    """`torchrun --nproc-per-node 2 -m sigprop train --stages 2` (c10d rendezvous on the
    loopback address) gives the launcher's result."""
    ours = _train(fake_fashion, tmp_path / "ours", "--stages", 2, epochs=1)
    assert ours.returncode == 0, ours.stderr
    port = __import__("sigprop.parallel.launch", fromlist=["free_port"]).free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m",
           "sigprop", "train", "--data-dir", fake_fashion, "--run-dir", tmp_path / "tr",
           "--network", "fc-3x32", "--batch-size", 64, "--eval-batch-size", 100, "--epochs",
           1, "--no-progress", "--pipeline", "off", "--stages", 2, "--stage-threads", 1]
    res = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _final_state(tmp_path / "ours"), _final_state(tmp_path / "tr")
    for key, v in a["rule"]["modules"].items():
        assert torch.equal(b["rule"]["modules"][key], v), key
    # rank 0 settled the split (timed), printed it, and both stages trained it
    plan = json.loads((tmp_path / "tr" / "config.json").read_text())["stage_plan"]
    assert plan["by"] == "measured" and f"split {plan['split'][0]}," in res.stdout
    index = ck.read_stages(tmp_path / "tr")
    assert index["split"] == plan["split"]
    assert [ck.load_stage_file(tmp_path / "tr", index, r)["split"] for r in range(2)] == [
        plan["split"]] * 2


@pytest.mark.slow
@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not installed")
def test_torchrun_max_restarts_continue_from_the_checkpoint(tmp_path):
    """Under torchrun, a stage killed mid-run makes the agent restart the job, which
    continues from the last consistent checkpoint and finishes."""
    run = tmp_path / "run"
    port = __import__("sigprop.parallel.launch", fromlist=["free_port"]).free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "-m", "sigprop", "train", "--data-dir", REAL, "--run-dir", run,
           "--network", "fc-3x256", "--train-limit", 6000, "--test-limit", 500, "--epochs", 6,
           "--no-progress", "--stages", 2, "--stage-threads", 1]
    agent = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / ck.STAGES_FILE).exists():
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        workers = [p for p in _children(agent.pid) if Path(f"/proc/{p}/environ").exists()]
        victim = next(p for p in workers if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        out, err = agent.communicate(timeout=TIMEOUT)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, [ln for ln in err.splitlines() if "sigprop: error" in ln]
    assert "resuming" in out
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_a_stage_that_fails_to_start_says_why_in_one_line(tmp_path):
    """Rank 0 cannot read the data: its line names the cause, the other stages stop
    without a word, the launcher adds nothing (no epoch to resume from), exit 2."""
    run = tmp_path / "run"
    res = _train(tmp_path / "no-such-data", run, "--stages", 2)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sigprop: error: stage 1/2:"), res.stderr
    assert not run.exists()


def test_a_stage_keeps_only_the_blocks_it_trains():
    """release_unowned empties other blocks (and, past the first stage, the signal);
    the stage's own steps and evaluation are unchanged, bit for bit."""
    from sigprop.parallel.stage import release_unowned

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(head="classifier", pipeline="off")
        full, lean = sigprop_rule(**kw), sigprop_rule(**kw)
        before = sum(p.numel() for p in lean.modules.parameters())
        assert release_unowned(lean, 1, 3) > 0
        after = sum(p.numel() for p in lean.modules.parameters())
        assert after < before
        assert all(p.numel() == 0 for p in lean.network.blocks[0].parameters())
        assert all(p.numel() == 0 for p in lean.signal.parameters())
        for x, y in random_batches(k=3):
            _, _, z = full.stage_step(x, y, 0, 1)
            a = full.stage_step(z.clone(), y, 1, 3)
            b = lean.stage_step(z.clone(), y, 1, 3)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for key in ("network.blocks.2.0.weight", "network.head.weight"):
            assert torch.equal(full.state_dict()["modules"][key], lean.state_dict()["modules"][key])
    finally:
        torch.set_num_threads(saved)


def test_a_staged_run_folder_refuses_a_fresh_run_and_a_damaged_part_in_one_line(
        fake_fashion, tmp_path):
    run = tmp_path / "run"
    assert _train(fake_fashion, run, "--stages", 2, epochs=1).returncode == 0
    again = _train(fake_fashion, run, "--stages", 2, epochs=1)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"sigprop: error: run folder {run} already holds a run; pass --resume to continue "
        "it or choose another --run-dir"]
    part = run / ck.read_stages(run)["files"][1]
    part.write_bytes(part.read_bytes()[:1000])  # a damaged stage file
    before = {p.name: p.read_bytes() for p in (run / "stages").iterdir()}
    res = _sigprop("train", "--resume", "--run-dir", run, "--epochs", 2, "--no-progress")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stage 2's part of epoch 1" in lines[0], res.stderr
    assert {p.name: p.read_bytes() for p in (run / "stages").iterdir()} == before
    assert ck.read_stages(run)["epoch"] == 1
    # a missing part, resumed staged or in one process: one line, nothing rewritten
    config = (run / "config.json").read_bytes()
    part.unlink()
    for extra in (("--stages", 2), ()):
        res = _sigprop("train", "--resume", "--run-dir", run, "--epochs", 2, "--no-progress",
                       *extra)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert (run / "config.json").read_bytes() == config


# --- data-parallel replicas of the stages -------------------------------------------------
def _replicated_reference(run_dir, replicas, signal_name):
    """The run of ``run_dir`` (one stage per replica) computed in this process: one rule
    per replica on its share of every batch, its gradients summed with the others'
    (weighted by shares; each rule on its own thread, meeting at a barrier) before its
    Adam step, BatchNorm statistics and prototypes merged at each epoch's end."""
    import threading

    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from sigprop.engine.runio import read_run_config
    from sigprop.engine.config import config_from_dict
    from sigprop.engine.trainer import build_config_rule, build_experiment, set_epoch_lr
    from sigprop.parallel.transport import shard

    cfg = config_from_dict(read_run_config(run_dir / "config.json")["config"])
    exp = build_experiment(cfg)
    rules = [exp.rule] + [build_config_rule(cfg, torch.device("cpu"))
                          for _ in range(replicas - 1)]
    blocks = len(exp.rule.network.blocks)
    barrier = threading.Barrier(replicas)
    pending, share = [None] * replicas, [1.0] * replicas

    def hook(j):
        def reduce(grads):
            pending[j] = _flatten_dense_tensors(grads).mul_(share[j])
            barrier.wait()
            total = pending[0].clone()
            for k in range(1, replicas):
                total += pending[k]
            barrier.wait()
            for g, r in zip(grads, _unflatten_dense_tensors(total, grads)):
                g.copy_(r)
        return reduce

    for j, rule in enumerate(rules):
        rule.grad_reduce = hook(j)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(cfg.train.epochs):
            for rule in rules:
                set_epoch_lr(rule, cfg, epoch)
                rule.set_training(True)
            for x, y in exp.train.epoch(epoch):
                work = []
                for j, rule in enumerate(rules):
                    a, b = shard(y.shape[0], replicas, j)
                    share[j] = (b - a) / y.shape[0]
                    work.append(threading.Thread(target=rule.stage_step,
                                                 args=(x[a:b], y[a:b], 0, blocks)))
                for t in work:
                    t.start()
                for t in work:
                    t.join()
            states = [r.modules.state_dict() for r in rules]
            for key, v in states[0].items():
                name = key.rsplit(".", 1)[-1]
                if name in ("running_mean", "running_var"):
                    total = v.clone()
                    for s in states[1:]:
                        total += s[key]
                    total /= replicas
                    for s in states:
                        s[key].copy_(total)
                elif signal_name == "label-input" and name.startswith("mean"):
                    seen = [s[key[:-len(name)] + "seen" + name[4:]] for s in states]
                    w = sum(z.to(v.dtype) for z in seen)
                    rows = w.view(-1, *(1,) * (v.dim() - 1))
                    total = sum(s[key] * z.to(v.dtype).view_as(rows)
                                for s, z in zip(states, seen))
                    merged = torch.where(rows > 0, total / rows.clamp(min=1), v)
                    for s, z in zip(states, seen):
                        s[key].copy_(merged)
                        z.copy_(w > 0)
    finally:
        torch.set_num_threads(saved)
    return exp.rule.modules.state_dict()


@pytest.mark.parametrize("signal_name", ["label", "label-input"])
def test_replicas_all_reduce_each_stages_gradients(fake_fashion, tmp_path, signal_name):
    """--stages 2 --replicas 2 (four processes) ends with the parameters, BatchNorm
    statistics and prototypes of two replicas computed in one process from the same
    shares of the same batches: gradients summed by shares before each Adam step."""
    run = tmp_path / "run"
    res = _train(fake_fashion, run, "--stages", 2, "--replicas", 2, "--signal", signal_name,
                 "--batch-size", 50)
    assert res.returncode == 0, res.stderr
    assert "in 2 stages x 2 replicas" in res.stdout
    got = _final_state(run)["rule"]["modules"]
    want = _replicated_reference(run, 2, signal_name)
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert torch.equal(got[key], v), key
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["test_acc"] > 0.3  # ten classes
    assert history[-1]["stages"]["stage1"]["replicas"] == 2


def test_replicas_resume_and_evaluate_like_any_staged_run(fake_fashion, tmp_path):
    """Replicas alone (one stage, two processes); the run resumes with the same replicas,
    its checkpoint evaluates in one process, and its records count every sample once."""
    run = tmp_path / "run"
    first = _train(fake_fashion, run, "--replicas", 2, epochs=1)
    assert first.returncode == 0, first.stderr
    again = _sigprop("train", "--resume", "--run-dir", run, "--epochs", 2, "--no-progress")
    assert again.returncode == 0, again.stderr
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    ev = _sigprop("eval", run, "--data-dir", fake_fashion)
    assert ev.returncode == 0, ev.stderr
    assert f"test accuracy: {history[-1]['test_acc']:.4f}" in ev.stdout
    changed = _sigprop("train", "--resume", "--run-dir", run, "--epochs", 3, "--replicas", 1,
                       "--no-progress")
    assert changed.returncode == 2 and "replicas" in changed.stderr


@pytest.mark.parametrize("flags, match", [
    (["--replicas", 0], "train.replicas must be a positive integer"),
    (["--replicas", 2, "--pipeline", "on"], "--pipeline auto or off with --replicas"),
    (["--replicas", 4, "--batch-size", 6], "choose a --batch-size of 8 or more"),
    (["--replicas", 40], "would start 40 processes, more than the"),
    (["--replicas", 2, "--batch-size", 73], "but a batch holds 2"),
])
def test_bad_replica_settings_stop_in_one_line(fake_fashion, tmp_path, flags, match):
    res = _train(fake_fashion, tmp_path / "run", *flags)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], res.stderr


def test_cuda_stages_need_a_device_each(monkeypatch):
    """NCCL refuses two ranks on one device: more stage processes than CUDA devices on a
    machine is one clear error before anything starts."""
    from sigprop.engine.config import Config, apply_overrides
    from sigprop.parallel.split import check_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = apply_overrides(Config(), {"train": {"device": "cuda", "stages": 2}})
    with pytest.raises(ConfigError, match="2 stage processes on this machine but 1 CUDA"):
        check_devices(cfg, 2)
    check_devices(cfg, 1)
    check_devices(apply_overrides(Config(), {"train": {"stages": 2}}), 4)  # a CPU run


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300", "1e-9", "abc", ""])
def test_stage_timeout_refuses_values_a_process_group_cannot_take(monkeypatch, value):
    from sigprop.errors import ConfigError
    from sigprop.parallel.stage import timeout_s

    monkeypatch.setenv("SIGPROP_STAGE_TIMEOUT", value)
    with pytest.raises(ConfigError, match="SIGPROP_STAGE_TIMEOUT must be a number of seconds"):
        timeout_s()
    monkeypatch.setenv("SIGPROP_STAGE_TIMEOUT", "12.5")
    assert timeout_s() == 12.5
