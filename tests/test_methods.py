"""Baselines (spec section 6): alone, kd, dml, param_share — plus the method registry.

Each step is checked against an independent re-computation: deep copies of the models see
the batch the role is about to draw, the expected loss is written out by hand, and with
plain SGD (no momentum / decay) the new weights must equal ``w - lr * grad``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mergenet_core.config.checks import parse_config
from mergenet_core.config import ConfigErrors, deep_merge
from mergenet_core.training.engine import PairState
from mergenet_core.errors import ConfigError
from mergenet_core.lowrank import conv_to_matrix, rms
from mergenet_core.methods import METHODS, Method
from mergenet_core.training.step import take_step

LR = 0.1
FMNIST = {"name": "fashion_mnist", "options": {"train_subset": 200, "test_subset": 50}}
CNN = {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}}
CONV = "features.1.conv.weight"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(method: str, options: dict | None = None, *, source: dict | None = CNN,
             source_task: dict = FMNIST, target: dict = CNN, **overrides):
    data = {
        "name": "m", "seed": 0, "device": "cpu",
        "target": {"model": copy.deepcopy(target), "task": copy.deepcopy(FMNIST)},
        "recipe": {"optimizer": {"name": "sgd", "lr": LR, "momentum": 0.0, "weight_decay": 0.0},
                   "schedule": {"name": "constant"}, "epochs": 1, "batch_size": 32, "augment": False},
        "method": {"name": method, "options": copy.deepcopy(options or {})},
    }
    if source is not None:
        data["source"] = {"model": copy.deepcopy(source), "task": copy.deepcopy(source_task)}
    return parse_config(deep_merge(data, overrides))


def build(method: str, options: dict | None = None, **kw) -> PairState:
    return PairState.build(make_cfg(method, options, **kw))


def peek_batch(role):
    state = role.stream.state_dict()
    x, y = role.next_batch()
    role.stream.load_state_dict(state)
    return x, y


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def kl(teacher_logits, student_logits, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, batch mean — written out."""
    q = torch.softmax(teacher_logits.detach() / t, 1)
    return (q * (q.log() - torch.log_softmax(student_logits / t, 1))).sum(1).mean() * t * t


def expected_sgd(model, loss) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    return {n: p.detach() - LR * (g if g is not None else 0)
            for n, p, g in zip(names, model.parameters(), grads)}


def assert_params(model, expected: dict[str, torch.Tensor]) -> None:
    got = params(model)
    assert got.keys() == expected.keys()
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------- registry


def test_registry_has_every_method():
    assert set(METHODS.names()) >= {"alone", "mergenet", "kd", "dml", "param_share"}
    for name in ("alone", "mergenet", "kd", "dml", "param_share"):
        assert issubclass(METHODS.get(name).fn, Method)
    with pytest.raises(ConfigError, match="unknown method 'fitnet'"):
        METHODS.get("fitnet", "method.name")
    with pytest.raises(ConfigErrors, match="method.name: unknown method"):
        make_cfg("fitnet")


def test_method_defaults():
    kd = METHODS.options("kd", {})
    assert (kd.temperature, kd.weight, kd.train_source) == (4.0, 0.9, True)
    dml = METHODS.options("dml", {})
    assert (dml.temperature, dml.weight) == (1.0, 1.0)
    ps = METHODS.options("param_share", {"layer_pairs": [{"source": "a", "target": "b"}]})
    assert (ps.mix, ps.rescale, ps.t_cycle) == (1.0, True, 1)
    mn = METHODS.options("mergenet", {"layer_pairs": [{"source": "a", "target": "b"}]})
    assert (mn.update_rule, mn.t_cycle, mn.direction, mn.adapter.layers, mn.adapter.heads) == ("exact", 1, "forward", 2, 8)
    lp = mn.layer_pairs[0]
    assert (lp.mode, lp.rank, lp.output_scale) == ("learned", 4, "rms")
    a = mn.adapter
    assert (a.grad_clip, a.weight_decay, a.attn_dropout, a.ffn_dropout, a.schedule) == (50.0, 5e-4, 0.1, 0.2, "cosine")


# ---------------------------------------------------------------------------- alone


def test_alone_builds_no_source_and_takes_plain_steps():
    pair = build("alone")  # the config has a source: alone ignores it
    assert set(pair.roles) == {"target"}
    assert pair.method.roles(pair.method.options).needed == ("target",)
    assert pair.method.roles(pair.method.options).trained == ("target",)
    tgt = pair.roles["target"]
    x, y = peek_batch(tgt)
    ref = copy.deepcopy(tgt.model).train()
    want = expected_sgd(ref, F.cross_entropy(ref(x), y))
    take_step(pair, 0)
    assert_params(tgt.model, want)
    assert set(build("alone", source=None).roles) == {"target"}


def test_methods_that_need_a_source_say_so():
    for name, opts in [("kd", {}), ("dml", {}), ("param_share", {"layer_pairs": [{"source": CONV, "target": CONV}]})]:
        with pytest.raises(ConfigErrors) as err:
            make_cfg(name, opts, source=None)
        assert any(line.startswith("source:") for line in err.value.lines), (name, err.value.lines)


# ---------------------------------------------------------------------------- kd / dml


@pytest.mark.parametrize("method", ["kd", "dml"])
def test_kd_and_dml_need_one_label_space(method):
    text = {"name": "rotten_tomatoes", "options": {"train_subset": 200}}
    with pytest.raises(ConfigErrors) as err:
        make_cfg(method, source={"name": "minilm_l3", "options": {"num_layers": 1}}, source_task=text)
    line = next(line for line in err.value.lines if line.startswith("method.name:"))
    assert f"'{method}'" in line and "same task" in line
    assert "rotten_tomatoes" in line and "fashion_mnist" in line
    # same task, different label-space-changing options: still refused
    other = deep_merge(FMNIST, {"options": {"train_subset": 300}})
    with pytest.raises(ConfigErrors, match="method.name"):
        make_cfg(method, source_task=other)


def test_kd_online_teacher_and_hinton_loss():
    pair = build("kd", source={"name": "resnet18", "options": {"width": 8, "blocks": [1, 1, 1, 1]}})
    src, tgt = pair.roles["source"], pair.roles["target"]
    assert pair.method.roles(pair.method.options).trained == ("source", "target")
    x, y = peek_batch(tgt)
    teacher, student = copy.deepcopy(src.model).train(), copy.deepcopy(tgt.model).train()
    t_logits = teacher(x)                      # the teacher before its own step
    want_src = expected_sgd(teacher, F.cross_entropy(t_logits, y))
    s_logits = student(x)
    want_tgt = expected_sgd(student, 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kl(t_logits, s_logits, 4.0))
    take_step(pair, 0)
    assert_params(src.model, want_src)         # teacher trained beside the student, on its labels
    assert_params(tgt.model, want_tgt)         # student: 0.1 CE + 0.9 * T^2 KL at T = 4
    assert src.stats["steps"] == tgt.stats["steps"] == 1


def test_kd_with_a_fixed_teacher():
    pair = build("kd", {"train_source": False, "temperature": 2.0, "weight": 0.5})
    src, tgt = pair.roles["source"], pair.roles["target"]
    assert pair.method.roles(pair.method.options).trained == ("target",)
    before = copy.deepcopy(src.model.state_dict())
    x, y = peek_batch(tgt)
    teacher, student = copy.deepcopy(src.model).eval(), copy.deepcopy(tgt.model).train()
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = student(x)
    want = expected_sgd(student, 0.5 * F.cross_entropy(s_logits, y) + 0.5 * kl(t_logits, s_logits, 2.0))
    take_step(pair, 0)
    assert_params(tgt.model, want)
    after = src.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics


def test_dml_simultaneous_mutual_learning():
    pair = build("dml", source={"name": "mobilenetv2", "options": {"width_mult": 0.25}})
    src, tgt = pair.roles["source"], pair.roles["target"]
    x, y = peek_batch(tgt)
    a, b = copy.deepcopy(src.model).train(), copy.deepcopy(tgt.model).train()
    la, lb = a(x), b(x)                         # both predictions from before either step
    want_src = expected_sgd(a, F.cross_entropy(la, y) + kl(lb, la, 1.0))
    want_tgt = expected_sgd(b, F.cross_entropy(lb, y) + kl(la, lb, 1.0))
    take_step(pair, 0)
    assert_params(src.model, want_src)
    assert_params(tgt.model, want_tgt)


def test_kd_and_dml_run_through_the_engine(tmp_path):
    from mergenet_core.training.engine import Engine

    for name in ("kd", "dml"):
        cfg = make_cfg(name, recipe={"steps_per_epoch": 2})
        final = Engine(cfg, tmp_path / name, progress=False).run()
        assert final["steps"] == 2 and 0 <= final["target/final_test_acc"] <= 1
        assert "source/final_test_acc" in final


# ---------------------------------------------------------------------------- param_share


def _written(role, name: str) -> torch.Tensor:
    """The value written before this step's SGD update (momentum 0, no decay: w = w' - lr g)."""
    p = role.model.get_parameter(name)
    return (p.detach() + LR * p.grad).clone()


def test_param_share_projects_and_keeps_target_rms():
    # hidden.weight 32x16 -> classifier.weight 10x32: bilinear resize + RMS match
    pair = build("param_share", {"layer_pairs": [{"source": "hidden.weight", "target": "classifier.weight"}]})
    src, tgt = pair.roles["source"], pair.roles["target"]
    ws = src.model.hidden.weight.detach().clone()
    wt = tgt.model.classifier.weight.detach().clone()
    take_step(pair, 0)
    w = _written(tgt, "classifier.weight")
    torch.testing.assert_close(rms(w), rms(wt))
    resized = F.interpolate(ws[None, None], size=(10, 32), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(w, resized * (rms(wt) / rms(resized)), rtol=1e-5, atol=1e-6)
    assert src.stats["steps"] == tgt.stats["steps"] == 1  # both still train


def test_param_share_copies_equal_shapes_verbatim():
    pair = build("param_share", {"layer_pairs": [{"source": CONV, "target": CONV}], "rescale": False})
    src, tgt = pair.roles["source"], pair.roles["target"]
    ws = src.model.get_parameter(CONV).detach().clone()
    p = tgt.model.get_parameter(CONV)
    assert not torch.equal(ws, p.detach())  # different initialisations
    take_step(pair, 0)
    assert tgt.model.get_parameter(CONV) is p
    torch.testing.assert_close(_written(tgt, CONV), ws, rtol=1e-5, atol=1e-6)


def test_param_share_mix_and_t_cycle():
    pair = build("param_share", {"layer_pairs": [{"source": CONV, "target": CONV}], "rescale": False,
                                 "mix": 0.25, "t_cycle": 2})
    src, tgt = pair.roles["source"], pair.roles["target"]
    ws, wt = (r.model.get_parameter(CONV).detach().clone() for r in (src, tgt))
    take_step(pair, 0)
    torch.testing.assert_close(_written(tgt, CONV), 0.75 * wt + 0.25 * ws, rtol=1e-5, atol=1e-6)
    before = tgt.model.get_parameter(CONV).detach().clone()
    take_step(pair, 1)  # not a sharing step: only the optimiser moves it
    torch.testing.assert_close(_written(tgt, CONV), before, rtol=1e-5, atol=1e-7)


def test_param_share_conv_into_linear_uses_the_matrix_view():
    # features.1.conv.weight [16, 8, 3, 3] (16x72) -> classifier.weight 10x32
    pair = build("param_share", {"layer_pairs": [{"source": CONV, "target": "classifier.weight"}]})
    ws = conv_to_matrix(pair.roles["source"].model.get_parameter(CONV).detach().clone())
    wt = pair.roles["target"].model.classifier.weight.detach().clone()
    take_step(pair, 0)
    resized = F.interpolate(ws[None, None], size=(10, 32), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(_written(pair.roles["target"], "classifier.weight"),
                               resized * (rms(wt) / rms(resized)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["source", "target"])
def test_param_share_missing_parameter(side):
    lp = {"source": CONV, "target": CONV, side: "nope.weight"}
    with pytest.raises(ConfigError) as err:
        build("param_share", {"layer_pairs": [lp]})
    assert err.value.field == f"method.options.layer_pairs.0.{side}"
