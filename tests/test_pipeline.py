"""The pipelined sigprop step (sigprop.rules.sigprop.pipeline): block updates on an update thread.

It must make the same updates as the sequential step: bit for bit when every op
runs single-threaded either way, and up to float rounding otherwise; every path that
reads parameters must see all updates applied; an update's failure must surface.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_batches, run_steps, sigprop_rule

from sigprop.rules.sigprop import fastpath
from sigprop.errors import ConfigError, InputError, TrainingError
from sigprop.networks import build_network
from sigprop.rules.sigprop.pipeline import UpdateWorker, adam_group_step
from sigprop.rules import build_rule

CLASSES = 5


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def make(arch="fc-3x24", input_shape=(1, 6, 6), dropout=0.1, seed=0, **kw):
    return sigprop_rule(arch, input_shape, CLASSES, dropout, seed, **kw)


def data(k=5, n=30, input_shape=(1, 6, 6), seed=3):
    return random_batches(k, n, input_shape, CLASSES, seed)


run = run_steps


def states(rule):
    s = rule.state_dict()  # syncs
    return s["modules"], s["optimizers"]


CASES = [
    {},
    {"loss": "l2"},
    {"head": "classifier"},
    {"bn_stats": "all", "dropout": 0.0},
    {"signal": "label-input"},
    {"signal": "loop-pred", "head": "classifier"},
    {"signal": "loop-error", "head": "classifier", "exit_targets": "candidates"},
    {"arch": "fc-1x16"},
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_bit_identical_to_sequential_single_threaded(kw, float64, threads):
    """One thread in the sequential run, one per thread in the pipelined one: every
    op computes the same thing in the same order, so the results are equal exactly."""
    torch.set_num_threads(1)
    seq, pipe = make(pipeline="off", **kw), make(pipeline="on", **kw)
    assert not seq.pipelines and pipe.pipelines
    out_s, out_p = run(seq, data()), run(pipe, data())
    for (ls, cs), (lp, cp) in zip(out_s, out_p):
        assert torch.equal(ls, lp) and torch.equal(cs, cp)
    (ms, os_), (mp, op) = states(seq), states(pipe)
    for k in ms:
        assert torch.equal(ms[k], mp[k]), k
    for a, b in zip(os_, op):
        for sa, sb in zip(a["state"].values(), b["state"].values()):
            for k in sa:
                assert torch.equal(sa[k], sb[k]), k
    assert torch.get_num_threads() == 1  # given back by sync


def test_same_updates_with_two_threads(float64, threads):
    """Two threads: the main thread and the worker get one each while updates are in
    flight (matmuls then split differently: equal up to rounding)."""
    torch.set_num_threads(2)
    arch = "fc-2x512"  # 280 k Linear weights: enough for auto
    seq, pipe = make(arch, pipeline="off"), make(arch)  # auto: on with >= 2 threads
    assert pipe.pipelines and "second thread" in pipe.step_kind
    run(seq, data())
    pipe.set_training(True)
    torch.manual_seed(7)
    for x, y in data():
        pipe.train_step(x, y)
        assert torch.get_num_threads() == 1  # the main thread's share
    pipe.sync()
    assert torch.get_num_threads() == 2
    (ms, _), (mp, _) = states(seq), states(pipe)
    for k in ms:
        torch.testing.assert_close(ms[k], mp[k], atol=1e-9, rtol=1e-7, msg=k)


def test_auto_stays_sequential_on_one_thread(threads):
    torch.set_num_threads(1)
    rule = make("fc-2x512")
    assert not rule.pipelines and "in sequence" in rule.step_kind


def test_auto_stays_sequential_for_small_blocks(threads):
    torch.set_num_threads(2)
    rule = make()  # fc-3x24: the hand-offs would cost more than they save
    assert not rule.pipelines and "too small" in rule.step_kind
    assert make(pipeline="on").pipelines


def test_auto_stays_sequential_for_loop_back_generators(threads):
    torch.set_num_threads(2)
    rule = make("fc-2x512", signal="loop-error", head="classifier")
    assert not rule.pipelines and "label-free pass" in rule.step_kind
    assert make("fc-2x512", signal="label-input").pipelines  # Eq. 10 needs no such pass


def test_readers_see_every_update(threads):
    """eval, predict, state_dict, deepcopy and set_training wait for the updates."""
    torch.set_num_threads(1)
    seq, pipe = make(pipeline="off"), make(pipeline="on")
    run(seq, data())
    run(pipe, data())  # no explicit sync
    x = data(1, seed=9)[0][0]
    copied = copy.deepcopy(pipe)
    for rule in (seq, pipe, copied):
        rule.set_training(False)
    assert torch.equal(seq.predict(x), pipe.predict(x))
    assert torch.equal(seq.predict(x), copied.predict(x))
    run(pipe, data(2))
    pipe.set_training(False)
    assert not torch.equal(seq.predict(x), pipe.predict(x))  # the new updates landed


def test_hooks_mid_training_fall_back_after_sync(threads):
    torch.set_num_threads(1)
    seq, pipe = make(pipeline="off"), make(pipeline="on")
    batches = data(4)
    run(seq, batches[:2])
    run(pipe, batches[:2])
    for rule in (seq, pipe):  # hooks: only the autograd path honours them
        rule.network.blocks[1].register_forward_hook(lambda *a: None)
    torch.manual_seed(11)
    out_s = [seq.train_step(x, y) for x, y in batches[2:]]
    torch.manual_seed(11)
    out_p = [pipe.train_step(x, y) for x, y in batches[2:]]
    for (ls, _), (lp, _) in zip(out_s, out_p):
        torch.testing.assert_close(ls, lp)


def test_update_failure_is_raised_on_the_main_thread(monkeypatch, threads):
    torch.set_num_threads(1)
    rule = make(pipeline="on")
    x, y = data(1)[0]

    def broken(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(fastpath, "op_backward", broken)
    rule.set_training(True)
    with pytest.raises(TrainingError, match="update thread.*boom.*--pipeline off"):
        for _ in range(3):
            rule.train_step(x, y)
        rule.sync()


def test_lagging_peak_memory_is_bounded():
    """With updates held back as far as allowed, at most one (n + m)-row tensor more
    than the sequential step's peak is alive: block i's pre-BatchNorm activation
    during block i+1's product, or its input while its weight gradient waits."""
    class Meter:
        """Live and peak bytes of the tensors the fast path keeps, by storage."""

        def __init__(self):
            self.live = self.peak = 0
            self.refs = {}  # storage pointer -> handles

        def pack(self, t):
            return Handle(self, t.untyped_storage())

    class Handle:
        def __init__(self, meter, storage):
            self.meter, self.key, self.n = meter, storage.data_ptr(), storage.nbytes()
            if meter.refs.get(self.key, 0) == 0:
                meter.live += self.n
                meter.peak = max(meter.peak, meter.live)
            meter.refs[self.key] = meter.refs.get(self.key, 0) + 1

        def __del__(self):
            self.meter.refs[self.key] -= 1
            if self.meter.refs[self.key] == 0:
                self.meter.live -= self.n

    peaks = {}
    for mode in ("off", "on"):
        rule = make("fc-3x64", pipeline=mode)
        rule.set_training(True)
        x, y = data(1)[0]
        rule.train_step(x, y)
        rule.sync()
        meter = Meter()
        with fastpath.track_saved(meter.pack), rule.lagging_updates():
            rule.train_step(x, y)
            rule.sync()
        peaks[mode] = meter.peak
        assert meter.live == 0
    block_input = (30 + CLASSES) * 64 * 4
    assert peaks["off"] < peaks["on"] <= peaks["off"] + block_input


def test_bad_batch_with_updates_in_flight_changes_nothing(threads):
    """A malformed batch is refused before the pipelined step queues anything, even
    while the previous step's updates are still pending: the result equals a run
    without the bad call, bit for bit."""
    torch.set_num_threads(1)
    ref, rule = make(pipeline="on"), make(pipeline="on")
    batches = data(2)
    run(ref, batches)
    rule.set_training(True)
    torch.manual_seed(7)
    x, y = batches[0]
    with rule.lagging_updates():  # the updates wait until the main thread does
        rule.train_step(x, y)
        pending = rule._pipe._s
        assert pending.finished < pending.submitted
        for bad_x, bad_y in ((x, torch.full_like(y, CLASSES)), (x.double(), y), (x[:1], y[:1])):
            with pytest.raises(InputError):
                rule.train_step(bad_x, bad_y)
        assert pending.finished < pending.submitted  # nothing waited, nothing queued
        rule.train_step(*batches[1])
    (ma, oa), (mb, ob) = states(ref), states(rule)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    for a, b in zip(oa, ob):
        for sa, sb in zip(a["state"].values(), b["state"].values()):
            for k in sa:
                assert torch.equal(sa[k], sb[k]), k


def test_adam_group_step_matches_adam_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1,
                         weight_decay=0.01, fused=True)
    b = torch.optim.Adam([{"params": twins[:1]}, {"params": twins[1:]}], lr=0.1,
                         weight_decay=0.01, fused=True)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g, g.clone()
        a.step()
        for group in b.param_groups:
            adam_group_step(b, group, group["lr"])
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def test_config_errors(threads):
    with pytest.raises(ConfigError, match="pipeline must be"):
        make(pipeline="sometimes")
    with pytest.raises(ConfigError, match="needs the fast path"):
        make(pipeline="on", fast_path="off")
    net = build_network("fc-2x8", (1, 6, 6), CLASSES)
    net.blocks[1].append(torch.nn.Identity())  # not a standard block: autograd path
    with pytest.raises(ConfigError, match="pipeline='on' but the fast path does not apply"):
        build_rule("sigprop", net, CLASSES, pipeline="on")


def test_worker_threads_stop_with_their_owner():
    worker = UpdateWorker(2)
    worker.begin()
    thread = worker._thread
    worker.submit(0, lambda: None)
    worker.close()
    assert not thread.is_alive() and torch.get_num_threads() >= 1


def test_input_batch_may_be_reused_when_train_step_returns(threads):
    """Only block 1's update reads the input batch; it is done before train_step
    returns, so a loop that refills one buffer gets the same updates."""
    torch.set_num_threads(1)
    fresh, reused = make("fc-2x16", pipeline="on"), make("fc-2x16", pipeline="on")
    batches = data(4)
    run(fresh, batches)
    reused.set_training(True)
    torch.manual_seed(7)
    buf_x, buf_y = batches[0][0].clone(), batches[0][1].clone()
    with reused.lagging_updates():  # updates as late as allowed: the worst case
        for x, y in batches:
            buf_x.copy_(x)
            buf_y.copy_(y)
            reused.train_step(buf_x, buf_y)
    (ma, _), (mb, _) = states(fresh), states(reused)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def test_process_exits_cleanly_with_the_worker_alive(tmp_path):
    """A script that ends (or is interrupted) while the update thread lives must exit
    normally; a thread still alive at interpreter teardown aborted the process
    ("terminate called without an active exception", exit code 134)."""
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import torch, sigprop\n"
        "torch.manual_seed(0)\n"
        "net = sigprop.build_network('fc-2x64', (1, 6, 6), 5, dropout=0.1)\n"
        "rule = sigprop.build_rule('sigprop', net, 5, pipeline='on')\n"
        "rule.set_training(True)\n"
        "x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 5, (32,))\n"
        "for _ in range(3):\n"
        "    rule.train_step(x, y)\n"
        "print('done')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done" and "terminate" not in out.stderr
