"""Bad inputs to the library API: one SigpropError naming the argument and the fix,
raised before anything changes.

Each malformed batch is given to ``train_step``, ``eval_step``, ``predict`` and
``exit_scores`` of every rule and step kind (sigprop written out, through autograd,
pipelined; backprop; shallow); the error must be an InputError whose message names
the argument, and the rule's whole state (parameters, BatchNorm running statistics,
prototypes, optimizer state, gradients, the global RNG) must be bit-identical after
the failed call. Then the options: rule config values, num_classes and the head,
network strings, dropout.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sigprop
from sigprop.errors import ConfigError, InputError, SigpropError
from sigprop.networks import MAX_DROPOUT, Dropout, Network, build_network
from sigprop.rules.base import RuleConfig

CLASSES, SHAPE, N = 3, (1, 4, 4), 6

RULES = {
    "sigprop-fast": ("sigprop", {"dropout": 0.1}),
    "sigprop-autograd": ("sigprop", {"fast_path": "off"}),
    "sigprop-pipelined": ("sigprop", {"pipeline": "on", "dropout": 0.1}),
    "sigprop-loop-error": ("sigprop", {"signal": "loop-error", "head": "classifier"}),
    "backprop": ("backprop", {}),
    "shallow": ("shallow", {}),
}


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def make(kind: str):
    """A rule of ``kind`` on fc-2x16 after one good training step (so that optimizer
    state, running statistics and, pipelined, an update in flight exist)."""
    name, options = RULES[kind]
    options = dict(options)
    torch.manual_seed(0)
    net = build_network("fc-2x16", SHAPE, CLASSES, dropout=options.pop("dropout", 0.0))
    rule = sigprop.build_rule(name, net, CLASSES, **options)
    rule.set_training(True)
    rule.train_step(*good())
    return rule


def good(n: int = N):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % CLASSES


def snapshot(rule) -> dict:
    """Everything a step could change, as clones (the state_dict syncs the pipeline)."""
    state = rule.state_dict()
    flat = {f"modules.{k}": v.clone() for k, v in state["modules"].items()}
    for i, opt in enumerate(state["optimizers"]):
        for p, entry in opt["state"].items():
            for k, v in entry.items():
                flat[f"opt{i}.{p}.{k}"] = v.clone() if torch.is_tensor(v) else v
    for k, p in rule.modules.named_parameters():
        flat[f"grad.{k}"] = None if p.grad is None else p.grad.clone()
    flat["rng"] = torch.get_rng_state()
    flat["training"] = [m.training for m in rule.modules.modules()]
    return flat


def assert_unchanged(before: dict, rule) -> None:
    after = snapshot(rule)
    assert before.keys() == after.keys()
    for k, a in before.items():
        b = after[k]
        if torch.is_tensor(a):
            assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), k
        else:
            assert a == b, k


# (id, x, y, pattern): the pattern must match the message (it names the argument)
def _batch_cases():
    x, y = good()
    return [
        ("x-list", x.tolist(), y, r"x must be a torch\.Tensor"),
        ("x-numpy", x.numpy(), y, r"x must be a torch\.Tensor"),
        ("x-uint8", (x * 50).clamp(0, 255).to(torch.uint8), y,
         r"x must be float32 like the network's parameters, got torch\.uint8; normalise"),
        ("x-float64", x.double(), y, r"x must be float32.*got torch\.float64; convert"),
        ("x-int64", x.long(), y, r"x must be float32.*got torch\.int64"),
        ("x-flattened", x.flatten(1), y, r"x must be shaped \(B, 1, 4, 4\).*x\.view"),
        ("x-one-sample-no-batch-axis", x[0], y[:1], r"x must be shaped.*unsqueeze"),
        ("x-other-channels", x.expand(N, 3, 4, 4), y, r"x must be shaped"),
        ("x-scalar", torch.tensor(1.0), y, r"x must be shaped"),
        ("x-other-device", x.to("meta"), y, r"x is on meta.*parameters are on cpu"),
        ("x-empty", x[:0], y[:0], r"x is an empty batch"),
        ("x-nan", x.index_fill(1, torch.tensor([0]), float("nan")), y, r"x holds NaN"),
        ("x-inf", x.index_fill(0, torch.tensor([2]), float("-inf")), y, r"x holds an infinity"),
        ("y-list", x, y.tolist(), r"y must be a torch\.Tensor"),
        ("y-float", x, y.float(), r"y must be int64.*got torch\.float32"),
        ("y-int32", x, y.int(), r"y must be int64.*got torch\.int32"),
        ("y-uint8", x, y.to(torch.uint8), r"y must be int64"),
        ("y-bool", x, y.bool(), r"y must be int64"),
        ("y-column", x, y.view(-1, 1), r"y must be shaped \(B,\).*flatten"),
        ("y-one-hot", x, torch.eye(CLASSES, dtype=torch.int64)[y], r"y must be shaped \(B,\)"),
        ("y-scalar", x, y[0], r"y must be shaped \(B,\)"),
        ("y-short", x, y[:-1], r"x holds 6 samples but y holds 5 labels"),
        ("y-long", x, torch.cat([y, y[:1]]), r"x holds 6 samples but y holds 7 labels"),
        ("y-other-device", x, y.to("meta"), r"y is on meta but x is on cpu"),
        ("y-equal-to-classes", x, torch.full((N,), CLASSES), r"y holds the label 3, outside 0\.\.2"),
        ("y-ten", x, torch.tensor([0, 1, 10, 2, 0, 1]), r"y holds the label 10"),
        ("y-negative", x, torch.tensor([0, -1, 1, 2, 0, 1]), r"y holds the label -1"),
    ]


BATCH_CASES = _batch_cases()
X_CASES = [c for c in BATCH_CASES if c[0].startswith("x-")]


@pytest.mark.parametrize("kind", RULES)
@pytest.mark.parametrize("case", BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_bad_batch_fails_before_anything_changes(kind, case, threads):
    """train_step and eval_step, in training mode."""
    torch.set_num_threads(1)
    _, x, y, pattern = case
    rule = make(kind)
    for method in (rule.train_step, rule.eval_step):
        before = snapshot(rule)
        with pytest.raises(InputError, match=pattern) as info:
            method(x, y)
        assert "\n" not in str(info.value) and "; " in str(info.value)
        assert_unchanged(before, rule)
    rule.train_step(*good())  # and the rule still trains
    assert torch.isfinite(rule.train_step(*good())[0]).all()


@pytest.mark.parametrize("kind", ["sigprop-fast", "sigprop-pipelined", "backprop"])
@pytest.mark.parametrize("case", X_CASES, ids=[c[0] for c in X_CASES])
@pytest.mark.parametrize("training", [True, False])
def test_bad_inputs_to_predict_and_exit_scores(kind, case, training, threads):
    torch.set_num_threads(1)
    _, x, _, pattern = case
    rule = make(kind)
    rule.set_training(training)
    for method in (rule.predict, rule.exit_scores):
        before = snapshot(rule)
        with pytest.raises(InputError, match=pattern):
            method(x)
        assert_unchanged(before, rule)


@pytest.mark.parametrize("kind", RULES)
def test_batch_of_one_in_training_is_refused_on_every_path(kind, threads):
    """A BatchNorm in training mode has zero variance on one sample: the fast path
    used to train on silently (4% accuracy), autograd and backprop raised torch's
    ValueError. Now one InputError everywhere; in eval mode one sample is fine."""
    torch.set_num_threads(1)
    rule = make(kind)
    x, y = good(1)
    for method, args in ((rule.train_step, (x, y)), (rule.eval_step, (x, y)),
                         (rule.predict, (x,)), (rule.exit_scores, (x,))):
        before = snapshot(rule)
        with pytest.raises(InputError, match=r"x holds 1 sample.*BatchNorm in training mode"):
            method(*args)
        assert_unchanged(before, rule)
    rule.set_training(False)
    assert rule.predict(x).shape == (1, CLASSES)
    assert rule.eval_step(x, y).shape == (len(rule.exit_names),)


@pytest.mark.parametrize("kind", RULES)
def test_train_step_in_evaluation_mode_is_refused(kind, threads):
    """After set_training(False) nothing may learn: one InputError, nothing changed."""
    torch.set_num_threads(1)
    rule = make(kind)
    rule.set_training(False)
    before = snapshot(rule)
    with pytest.raises(InputError, match=r"evaluation mode.*set_training\(True\)"):
        rule.train_step(*good())
    assert_unchanged(before, rule)
    rule.set_training(True)
    rule.train_step(*good())


def test_the_finite_check_can_be_skipped():
    """``check_finite = False`` leaves the batch to the caller (no pass over x)."""
    rule = make("backprop")
    rule.check_finite = False
    x, y = good()
    x[0, 0, 0, 0] = float("nan")
    losses, _ = rule.train_step(x, y)  # no check: the NaN reaches the loss
    assert not torch.isfinite(losses).all()


@pytest.mark.parametrize("other", [
    ("backprop", "fc-2x16"), ("sigprop", "fc-2x24"), ("sigprop", "fc-3x16"),
    ("shallow", "fc-2x16"), ("sigprop-loop-error", "fc-2x16"),
])
def test_loading_another_rules_state_changes_nothing(other, threads):
    """A state from another network or rule is refused before any of it is loaded."""
    torch.set_num_threads(1)
    rule = make("sigprop-fast")
    kind, arch = other
    name, options = RULES.get(kind, (kind, {}))
    torch.manual_seed(5)
    donor = sigprop.build_rule(name, build_network(arch, SHAPE, CLASSES), CLASSES, **options)
    donor.train_step(*good())
    before = snapshot(rule)
    with pytest.raises(sigprop.CheckpointError, match="another network, rule or signal"):
        rule.load_state_dict(donor.state_dict())
    assert_unchanged(before, rule)


def test_input_error_is_a_value_error_and_a_sigprop_error():
    rule = make("backprop")
    with pytest.raises(ValueError):
        rule.train_step(*good()[:1], torch.zeros(N))
    with pytest.raises(SigpropError):
        rule.predict([1, 2])


def test_good_batches_pass_in_every_accepted_form(threads):
    """Views, non-contiguous tensors and the largest label are all fine."""
    torch.set_num_threads(1)
    rule = make("sigprop-fast")
    x, y = good(8)
    y[0] = CLASSES - 1
    xt = x.transpose(2, 3)  # non-contiguous, same shape
    losses, correct = rule.train_step(xt, y)
    assert torch.isfinite(losses).all()
    assert rule.eval_step(x[::2], y[::2]).shape == correct.shape


# --------------------------------------------------------------------------- rule options


CONFIG_CASES = [
    ("lr", "abc"), ("lr", None), ("lr", True), ("lr", float("nan")), ("lr", float("inf")),
    ("lr", 0.0), ("lr", -1e-3), ("lr", [1e-3]), ("lr", torch.tensor(1e-3)),
    ("weight_decay", float("nan")), ("weight_decay", float("inf")), ("weight_decay", -1.0),
    ("weight_decay", "0"), ("weight_decay", None),
    ("logit_scale", float("inf")), ("logit_scale", float("nan")), ("logit_scale", 0.0),
    ("logit_scale", -2.0), ("logit_scale", "4"), ("logit_scale", False),
    ("eta", float("nan")), ("eta", float("inf")), ("eta", 0.0), ("eta", -1.0), ("eta", None),
    ("eta", "1"),
    ("signal", 3), ("signal", None), ("signal", ["label"]), ("signal", "nope"),
    ("head", None), ("head", "mlp"), ("loss", []), ("loss", "cos"), ("bn_stats", 1),
    ("exit_targets", True), ("fast_path", True), ("fast_path", "yes"), ("pipeline", 1),
    ("pipeline", "sometimes"), ("signal_learned", "yes"), ("signal_learned", 1),
]


@pytest.mark.parametrize("key,value", CONFIG_CASES, ids=[f"{k}={v!r}" for k, v in CONFIG_CASES])
def test_rule_config_values(key, value):
    with pytest.raises(ConfigError, match=key) as info:
        RuleConfig(**{key: value}).validate()
    assert "; " in str(info.value) and "\n" not in str(info.value)
    net = build_network("fc-2x16", SHAPE, CLASSES)
    with pytest.raises(ConfigError, match=key):
        sigprop.build_rule("backprop", net, CLASSES, **{key: value})


def test_eta_message_says_what_eta_is():
    with pytest.raises(ConfigError, match=r"eta must be a finite number, got nan \(the error "
                       r"step of the loop-error signal"):
        RuleConfig(eta=float("nan")).validate()


@pytest.mark.parametrize("ok", [{"lr": 1}, {"lr": 1e-3}, {"weight_decay": 0}, {"eta": 0.5},
                                {"logit_scale": None}, {"logit_scale": 2}])
def test_good_rule_config_values(ok):
    RuleConfig(**ok).validate()


def test_unknown_rule_option_and_bad_rule_name():
    net = build_network("fc-2x16", SHAPE, CLASSES)
    with pytest.raises(ConfigError, match="unknown rule option 'bogus'; choose from: lr"):
        sigprop.build_rule("sigprop", net, CLASSES, bogus=1)
    with pytest.raises(ConfigError, match="unknown rule 'xfa'"):
        sigprop.build_rule("xfa", net, CLASSES)
    with pytest.raises(ConfigError, match="rule name must be a string"):
        sigprop.build_rule(["sigprop"], net, CLASSES)
    with pytest.raises(ConfigError, match="cfg must be a RuleConfig"):
        sigprop.build_rule("sigprop", net, CLASSES, {"lr": 1e-3})


@pytest.mark.parametrize("rule", ["sigprop", "backprop", "shallow"])
@pytest.mark.parametrize("num_classes", [1, 0, -3, 2.5, True, "3", None])
def test_num_classes_must_be_an_integer_of_at_least_two(rule, num_classes):
    net = build_network("fc-2x16", SHAPE, CLASSES)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2"):
        sigprop.build_rule(rule, net, num_classes)


@pytest.mark.parametrize("rule", ["sigprop", "backprop", "shallow"])
def test_head_outputs_must_match_num_classes(rule):
    net = build_network("fc-2x16", SHAPE, 5)
    with pytest.raises(ConfigError, match=r"head outputs shape \(5,\).*3 classes"):
        sigprop.build_rule(rule, net, 3)
    odd = Network([nn.Sequential(nn.Flatten(), nn.Linear(16, 8))], nn.Identity(), SHAPE)
    with pytest.raises(ConfigError, match=r"head outputs shape \(8,\)"):
        sigprop.build_rule(rule, odd, 3)


def test_rule_needs_a_network():
    with pytest.raises(ConfigError, match="network must be a sigprop.Network"):
        sigprop.build_rule("backprop", nn.Linear(4, 3), 3)


# --------------------------------------------------------------------------- networks


def test_head_that_does_not_fit_the_last_block():
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8))]
    with pytest.raises(ConfigError, match=r"head Linear takes 32 input features.*outputs 8"):
        Network(blocks, nn.Linear(32, CLASSES), SHAPE)
    with pytest.raises(ConfigError, match=r"head Sequential takes 12 .*outputs 8"):
        Network(blocks, nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), SHAPE)
    with pytest.raises(ConfigError, match=r"head Unflatten does not accept block 1's output"):
        Network(blocks, nn.Unflatten(1, (3, 3)), SHAPE)
    net = Network(blocks, nn.Linear(8, CLASSES), SHAPE)  # and one that fits
    assert net.output_shape == (CLASSES,) and net.training and net.blocks[0][2].training


def test_shape_inference_restores_every_modules_mode():
    inner = nn.BatchNorm1d(8)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(16, 8), inner)]
    inner.eval()  # a user's choice inside a block in training mode
    net = Network(blocks, nn.Linear(8, CLASSES), SHAPE)
    assert net.blocks[0].training and not inner.training


@pytest.mark.parametrize("shape", [(0, 4), (-1,), ("a", 2), None, (2.5,)])
def test_bad_input_shape(shape):
    with pytest.raises(ConfigError, match="input_shape"):
        Network([nn.Linear(4, 4)], nn.Linear(4, 2), shape)


@pytest.mark.parametrize("name,pattern", [
    ("fc-\u0663x32", "architecture"),  # Arabic-Indic three: not an ASCII digit
    ("fc-3x\uff13\uff12", "architecture"),  # full-width digits
    ("fc-3x", "architecture"), ("fc-x3", "architecture"), ("fc--3x3", "architecture"),
    ("fc-3x1000000000", r"fc-3x1000000000: 2\.00e\+18 parameters.*smaller --network"),
    ("fc-1x100000000000", r"parameters.*smaller --network"),
    ("fc-1001x2", r"1001 layers, more than the 1000.*smaller --network"),
    ("fc-99999999999999999999x2", r"a 20-digit number of layers.*smaller --network"),
    ("fc-2x" + "9" * 5000, r"5000-digit number of units.*smaller --network"),
    ("fc-2x" + "9" * 14, r"units, more than the 1e\+12.*smaller --network"),
])
def test_bad_fc_architectures_fail_fast(name, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_network(name, (1, 28, 28), 10)


def test_network_name_must_be_a_string():
    with pytest.raises(ConfigError, match="network name must be a string"):
        build_network(3, SHAPE, CLASSES)


@pytest.mark.parametrize("p", [0.9999999, 1 - 0.4 / 65536, 1.0, 1.5, -0.1, float("nan"),
                               float("inf"), "0.1", None, True])
def test_bad_dropout(p):
    with pytest.raises(ConfigError, match="dropout"):
        Dropout(p)
    with pytest.raises(ConfigError, match="dropout"):
        build_network("fc-2x16", SHAPE, CLASSES, dropout=p)


def test_largest_dropout_keeps_some_units():
    d = Dropout(MAX_DROPOUT)
    assert d.scale == 65536.0 and math.isfinite(d.scale)
    torch.manual_seed(0)
    assert d(torch.ones(1_000_000)).count_nonzero() > 0
