"""The conv maps' memory layout of a run (``train.layout``): what auto chooses on which
hardware, the errors, the loader's batches, a run's record and its resume, and the
same training on both layouts."""

from __future__ import annotations

import json

import pytest
import torch

from sigprop.cli import main
from sigprop.data import DeviceLoader
from sigprop.engine import runio
from sigprop.engine.config import Config
from sigprop.engine.layout import apply_layout, resolve_layout
from sigprop.errors import ConfigError
from sigprop.networks import build_network

from helpers import FAST

CPU = torch.device("cpu")


def net(name: str, shape=(1, 28, 28)):
    return build_network(name, shape, 10)


@pytest.mark.parametrize("kernels, want", [("AVX512", "channels-last"), ("AVX2", "channels-last"),
                                           ("DEFAULT", "nchw"), ("ZVECTOR", "nchw")])
def test_auto_lays_conv_nets_out_channels_last_on_avx_cpus(monkeypatch, kernels, want):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    layout, why = resolve_layout("auto", net("conv"), "conv", "sigprop", CPU)
    assert layout == want and why.startswith("auto:") and (kernels in why or want == "nchw")


def test_auto_keeps_nchw_where_channels_last_is_not_measured(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert resolve_layout("auto", net("fc-2x32"), "fc-2x32", "sigprop", CPU) == ("nchw", "auto: no conv layer")
    layout, why = resolve_layout("auto", net("conv"), "conv", "sigprop", torch.device("cuda"))
    assert layout == "nchw" and "cuda" in why
    layout, why = resolve_layout("auto", net("snn-conv"), "snn-conv", "sp-voltage", CPU)
    assert layout == "nchw" and "spiking" in why
    # what is asked for is taken
    assert resolve_layout("nchw", net("conv"), "conv", "sigprop", CPU) == ("nchw", "asked for")
    assert resolve_layout("channels-last", net("conv"), "conv", "ll-fa", torch.device("cuda"))[0] \
        == "channels-last"


def test_auto_follows_what_each_rule_declares(monkeypatch):
    """auto lays conv nets out channels-last only for rules that declare it pays
    (measured); a rule that does not (the default, e.g. a plugin's) keeps NCHW."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    from sigprop.registry import RULES

    assert not RULES.get("pepita").channels_last_pays
    layout, why = resolve_layout("auto", net("conv"), "conv", "pepita", CPU)
    assert layout == "nchw" and "pepita's step is not faster" in why
    conv_rules = ("sigprop", "backprop", "shallow", "fa", "dfa", "drtp", "forward-grad",
                  "ll-bp", "ll-fa")
    for name in conv_rules:
        assert RULES.get(name).channels_last_pays, name
        assert resolve_layout("auto", net("conv"), "conv", name, CPU)[0] == "channels-last"


@pytest.mark.parametrize("name, says", [("fc-2x32", "has no conv layer"),
                                        ("snn-conv", "spiking network")])
def test_channels_last_where_it_cannot_apply_is_one_line(name, says):
    with pytest.raises(ConfigError, match=says):
        resolve_layout("channels-last", net(name), name, "sigprop", CPU)


def test_a_bad_layout_stops_at_validation():
    cfg = Config()
    cfg.train.layout = "nhwc"
    with pytest.raises(ConfigError, match="train.layout must be auto, nchw, channels-last"):
        cfg.validate()


def test_apply_layout_lays_out_the_conv_weights():
    n = apply_layout(net("conv"), "channels-last")
    convs = [m for m in n.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last)
                         for c in convs if c.in_channels > 1)


def test_the_loader_gives_batches_in_the_layout_with_the_same_values():
    images = torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(10) % 3
    kw = dict(batch_size=4, mean=[0.5] * 3, std=[0.25] * 3, shuffle=False)
    plain = list(DeviceLoader(images, labels, **kw).epoch(0))
    last = list(DeviceLoader(images, labels, memory_format=torch.channels_last, **kw).epoch(0))
    for (x, y), (xl, yl) in zip(plain, last):
        assert xl.is_contiguous(memory_format=torch.channels_last) and not xl.is_contiguous()
        assert torch.equal(x, xl) and torch.equal(y, yl)


def test_a_run_recorded_before_the_option_resumes_on_nchw():
    """config.json files written before train.layout existed hold no layout: those runs
    computed on NCHW maps, and a resume keeps them so."""
    cfg = Config().to_dict()
    del cfg["train"]["layout"]
    assert runio.recorded_config(cfg, "config.json").train.layout == "nchw"
    cfg["train"]["layout"] = "auto"
    assert runio.recorded_config(cfg, "config.json").train.layout == "auto"


CONV = ["--network", "conv", "--batch-size", "32", "--no-progress", "--train-limit", "96",
        "--test-limit", "64"]


def test_conv_runs_on_either_layout_record_it_and_learn_alike(fake_fashion, in_tmp, capsys):
    """The same conv run on NCHW and on channels-last maps: each layout printed and
    recorded, the weights laid out so, and the same losses up to float rounding (without
    dropout: its masks are drawn in memory order)."""
    finals = {}
    for layout in ("nchw", "channels-last"):
        run = in_tmp / layout
        assert main(["train", "--data-dir", str(fake_fashion), "--epochs", "1", "--run-dir",
                     str(run), "--layout", layout, *CONV]) == 0
        out = capsys.readouterr().out
        assert f"layout: {layout} (asked for)" in out
        record = json.loads((run / "config.json").read_text())
        assert record["layout"] == layout and record["config"]["train"]["layout"] == layout
        finals[layout] = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    a, b = finals["nchw"], finals["channels-last"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_resume_keeps_the_layout_and_may_change_it(fake_fashion, in_tmp, capsys):
    run = in_tmp / "run"
    assert main(["train", "--data-dir", str(fake_fashion), "--epochs", "1", "--run-dir",
                 str(run), "--layout", "channels-last", *CONV]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "2",
                 "--no-progress"]) == 0
    assert "layout: channels-last (asked for)" in capsys.readouterr().out
    # where the maps lie is not what the run computes: a resume may change it
    assert main(["train", "--resume", "--run-dir", str(run), "--epochs", "3", "--layout",
                 "nchw", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "layout: nchw (asked for)" in out and "train.layout 'channels-last' -> 'nchw'" in out


def test_fc_runs_print_no_layout(fake_fashion, in_tmp, capsys):
    assert main(["train", "--data-dir", str(fake_fashion), "--epochs", "1", "--run-dir",
                 str(in_tmp / "run"), "--train-limit", "128", *FAST]) == 0
    out = capsys.readouterr().out
    assert "layout:" not in out
    assert json.loads((in_tmp / "run" / "config.json").read_text())["layout"] == "nchw"


@pytest.mark.parametrize("rule", ["sigprop", "backprop", "shallow", "fa", "dfa", "drtp",
                                  "forward-grad", "ll-bp", "ll-fa"])
def test_every_rule_auto_lays_out_takes_the_same_step_on_channels_last_maps(rule, float64):
    """Each rule that --layout auto puts on channels-last maps updates its conv net as on
    NCHW maps (no dropout; float64, so only the summation order differs)."""
    from sigprop.rules import build_rule

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 28, 28, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    states = {}
    for layout in ("nchw", "channels-last"):
        torch.manual_seed(0)
        n = apply_layout(build_network("conv", (1, 28, 28), 3), layout)
        r = build_rule(rule, n, 3)
        r.set_training(True)
        torch.manual_seed(1)  # the rule's own draws (forward-gradient directions)
        xs = x.contiguous(memory_format=torch.channels_last) if layout != "nchw" else x
        for _ in range(2):
            r.train_step(xs, y)
        r.sync()
        states[layout] = {k: v.contiguous() for k, v in n.state_dict().items()}
    for k, v in states["nchw"].items():
        torch.testing.assert_close(states["channels-last"][k], v, rtol=1e-9, atol=1e-9,
                                   msg=lambda m, k=k: f"{rule} {k}: {m}")
