"""The MergeNet transfer cycle (spec section 5) on real tiny models and real Fashion-MNIST.

Every test builds a pair with :func:`mergenet_core.config.parse_config` and
:meth:`mergenet_core.training.engine.PairState.build`, then drives it either with ``take_step`` or in
two parts (``transfer``: the method's ``before_step``; ``train``: ``train_roles``) to look
between them.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from mergenet_core.config.checks import parse_config
from mergenet_core.config import deep_merge
from mergenet_core.data.base import TaskInfo
from mergenet_core.training.engine import PairState
from mergenet_core.errors import ConfigError, TransferError
from mergenet_core.lowrank import conv_to_matrix, make_encoding, matrix_to_weight
from mergenet_core.models import build_model
from mergenet_core.training.step import step_roles, take_step, train_roles
from mergenet_core.methods.mergenet import AdapterHub, Exchange, MergeNetOptions, make_links

LR = 0.1
FMNIST = {"name": "fashion_mnist", "options": {"train_subset": 200, "test_subset": 50}}  # 180 train, 5 steps/epoch
CNN = {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}}
CONV = "features.1.conv.weight"  # [16, 8, 3, 3] -> 16x72 matrix


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(options: dict, *, source: dict | None = CNN, source_task: dict = FMNIST,
             momentum: float = 0.0, **overrides):
    """A tiny MergeNet pair: plain SGD (lr 0.1, no decay, constant schedule, no clip, no augmentation)."""
    data = {
        "name": "t", "seed": 0, "device": "cpu",
        "target": {"model": copy.deepcopy(CNN), "task": copy.deepcopy(FMNIST)},
        "recipe": {"optimizer": {"name": "sgd", "lr": LR, "momentum": momentum, "weight_decay": 0.0},
                   "schedule": {"name": "constant"}, "epochs": 1, "batch_size": 32, "augment": False},
        "method": {"name": "mergenet", "options": copy.deepcopy(options)},
    }
    if source is not None:
        data["source"] = {"model": copy.deepcopy(source), "task": copy.deepcopy(source_task)}
    return parse_config(deep_merge(data, overrides))


def pair_opts(source: str = CONV, target: str = CONV, mode: str = "learned", rank: int = 4, **extra) -> dict:
    return {"t_cycle": 1, "layer_pairs": [{"source": source, "target": target, "mode": mode, "rank": rank}],
            **extra}


def build(options: dict, **kw) -> PairState:
    return PairState.build(make_cfg(options, **kw))


class RecordingExchange(Exchange):
    """The project's own in-process Exchange, recording what passes through it."""

    def __init__(self, hub):
        super().__init__(hub)
        self.outputs: dict[int, dict] = {}
        self.feedbacks: dict[int, dict] = {}

    def get(self, step, role):
        gen_step, out = super().get(step, role)
        self.outputs.setdefault(gen_step, {}).update({k: None if v is None else v.clone() for k, v in out.items()})
        return gen_step, out

    def feedback(self, gen_step, grads, epoch):
        self.feedbacks.setdefault(gen_step, {}).update({k: v.detach().clone() for k, v in grads.items()})
        super().feedback(gen_step, grads, epoch)


def recording(pair: PairState) -> RecordingExchange:
    ex = RecordingExchange(pair.method.exchange.hub)
    pair.method.attach(ex)
    return ex


def transfer(pair: PairState, step: int) -> None:
    """A transfer step's first part (``before_step``): every role's put, then get + in-place write."""
    pair.method.before_step(step, step_roles(pair))


def train(pair: PairState, step: int) -> None:
    """The rest of the step: every role's own optimiser step, then the adapter feedback."""
    train_roles(pair, step)


def peek_batch(role):
    """The batch ``role`` draws next, without consuming it (no augmentation in these configs)."""
    state = role.stream.state_dict()
    x, y = role.next_batch()
    role.stream.load_state_dict(state)
    return x, y


def touched(pair: PairState, role: str, param: str) -> torch.nn.Parameter:
    return pair.method.enc[(role, param)].parameters_touched()[0]


def adapter_state(pair: PairState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pair.method.exchange.hub.adapters.state_dict().items()}


# ---------------------------------------------------------------------------- in place


@pytest.mark.parametrize("mode", ["learned", "svd", "full"])
def test_transfer_writes_in_place_and_keeps_momentum(mode):
    pair = build(pair_opts(mode=mode), momentum=0.9)
    tgt = pair.roles["target"]
    take_step(pair, 0)  # creates the momentum buffers
    enc = pair.method.enc[("target", CONV)]
    p = enc.parameters_touched()[0]
    name = next(n for n, q in tgt.model.named_parameters() if q is p)
    state = tgt.optimizer.state[p]
    buf = state["momentum_buffer"].clone()
    before = p.detach().clone()
    assert any(q is p for g in tgt.optimizer.param_groups for q in g["params"])

    ex = recording(pair)
    transfer(pair, 1)
    new = ex.outputs[1]["0"]
    assert dict(tgt.model.named_parameters())[name] is p          # same Parameter object
    assert tgt.optimizer.state[p] is state                         # same optimiser state entry
    assert torch.equal(state["momentum_buffer"], buf)              # untouched by the write
    assert not torch.equal(p.detach(), before)                     # but the weight was rewritten
    if mode == "learned":
        assert torch.equal(p.detach(), new)                         # A <- A'
    elif mode == "full":
        assert torch.equal(p.detach(), matrix_to_weight(new, p.shape))
    else:  # svd: W0 + B (A' - A); the part outside the top-r subspace survives
        b, a = enc.factors
        w0 = conv_to_matrix(before)
        torch.testing.assert_close(conv_to_matrix(p.detach()), w0 + b @ (new - a))
        u, _, _ = torch.linalg.svd(w0, full_matrices=False)
        out = torch.eye(w0.shape[0]) - u[:, :4] @ u[:, :4].t()
        torch.testing.assert_close(out @ conv_to_matrix(p.detach()), out @ w0, atol=1e-5, rtol=1e-5)

    # the next step continues the kept momentum: buf' = 0.9 buf + grad (no weight decay)
    written = p.detach().clone()
    train(pair, 1)
    torch.testing.assert_close(state["momentum_buffer"], 0.9 * buf + p.grad)
    torch.testing.assert_close(p.detach(), written - LR * state["momentum_buffer"])


# ---------------------------------------------------------------------------- update rules


def _one_transfer(mode: str, rule: str, target: str = CONV):
    """Feedback sent for step 0 under ``rule``, plus dL/dA' by functional_call on the same batch."""
    pair = build(pair_opts(target=target, mode=mode, update_rule=rule,
                           adapter={"schedule": "constant"}))
    ex = recording(pair)
    tgt = pair.roles["target"]
    transfer(pair, 0)
    new = ex.outputs[0]["0"]
    enc = pair.method.enc[("target", target)]
    x, y = peek_batch(tgt)
    leaf = new.clone().requires_grad_(True)
    tgt.model.train()
    with tgt.rng_scope():
        loss, _ = tgt.loss(x, y, params=enc.override(leaf))
    (via_functional_call,) = torch.autograd.grad(loss, leaf)
    train(pair, 0)
    return ex.feedbacks[0]["0"], via_functional_call, pair


@pytest.mark.parametrize("mode,target", [("learned", CONV), ("svd", CONV), ("full", CONV),
                                         ("learned", "classifier.weight"), ("full", "hidden.weight")])
def test_delta_equals_lr_times_exact_and_exact_is_the_functional_call_gradient(mode, target):
    delta, _, _ = _one_transfer(mode, "delta", target)
    exact, fc_grad, _ = _one_transfer(mode, "exact", target)
    assert delta.shape == exact.shape == fc_grad.shape
    assert exact.abs().max() > 0
    # exact = dL/dA' through the generated weight, as functional_call computes it
    torch.testing.assert_close(exact, fc_grad, rtol=1e-5, atol=1e-8)
    # plain SGD: delta = A' - A_after = lr * dL/dA'
    torch.testing.assert_close(delta, LR * exact, rtol=1e-3, atol=1e-6 * float(exact.abs().max()))


#: the two optimisers whose state drowned the ``delta`` feedback (issue 19): SGD with momentum and
#: weight decay (the image study's recipe) and AdamW (the text study's)
CONTAMINATING = {
    "sgd-momentum-wd": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
    "adamw": {"optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}},
}


def _task_gradient(pair: PairState, step_outputs: dict, target: str = CONV) -> torch.Tensor:
    """dL/dA' of the target's loss on the batch it draws next, through the generated weight
    (``functional_call``), computed independently of the method's own bookkeeping: BatchNorm
    buffers are passed as copies and the stream is rewound, so the run itself is unchanged."""
    tgt = pair.roles["target"]
    enc = pair.method.enc[("target", target)]
    leaf = step_outputs["0"].clone().requires_grad_(True)
    x, y = peek_batch(tgt)
    buffers = {n: b.clone() for n, b in tgt.model.named_buffers()}
    tgt.model.train()
    with tgt.rng_scope():
        loss, _ = tgt.loss(x, y, params={**buffers, **enc.override(leaf)})
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def _feedback_vs_task_gradient(rule: str, recipe: dict, steps: int = 20, mode: str = "svd") -> list[float]:
    """Cosine of the feedback with dL/dA' at every transfer of a ``steps``-step run."""
    pair = build(pair_opts(mode=mode, update_rule=rule), recipe={**recipe, "epochs": 4})
    ex = recording(pair)
    cosines = []
    for step in range(steps):
        transfer(pair, step)
        g = _task_gradient(pair, ex.outputs[step])
        train(pair, step)
        fb = ex.feedbacks[step]["0"]
        cosines.append(float(torch.nn.functional.cosine_similarity(fb.flatten(), g.flatten(), dim=0)))
    return cosines


@pytest.mark.parametrize("optimiser", sorted(CONTAMINATING))
def test_default_feedback_is_the_task_gradient_at_every_transfer(optimiser):
    """The default rule (exact) feeds the adapter dL/dA' itself, whatever the target's optimiser
    does with its gradient; the authors' delta is that optimiser's step, and drifts away from it."""
    assert MergeNetOptions(**pair_opts()).update_rule == "exact"
    exact = _feedback_vs_task_gradient("exact", CONTAMINATING[optimiser])
    assert len(exact) == 20 and min(exact) >= 0.999, exact
    delta = _feedback_vs_task_gradient("delta", CONTAMINATING[optimiser])
    assert min(delta[5:]) < 0.9, delta  # momentum / weight decay / Adam's normalisation


def test_first_feedback_does_not_depend_on_the_target_learning_rate():
    """Same weights, batch and RNG at the first transfer: the exact feedback is identical for two
    target learning rates (delta scales with it: Delta ~ lr * g)."""
    fb = {}
    for rule in ("exact", "delta"):
        for lr in (0.05, 0.0005):
            pair = build(pair_opts(mode="svd", update_rule=rule),
                         recipe={"optimizer": {"lr": lr, "momentum": 0.9, "weight_decay": 5e-4}})
            ex = recording(pair)
            take_step(pair, 0)
            fb[(rule, lr)] = ex.feedbacks[0]["0"]
    assert torch.equal(fb[("exact", 0.05)], fb[("exact", 0.0005)])
    ratio = float(fb[("delta", 0.05)].norm() / fb[("delta", 0.0005)].norm())
    assert 50 < ratio < 200, ratio


def test_authors_preset_selects_delta_and_an_explicit_rule_wins():
    assert MergeNetOptions(**pair_opts(adapter={"preset": "authors"})).update_rule == "delta"
    assert MergeNetOptions(**pair_opts(adapter={"preset": "authors"}, update_rule="exact")).update_rule == "exact"
    assert MergeNetOptions(**pair_opts(adapter={"layers": 1})).update_rule == "exact"


@pytest.mark.parametrize("rule", ["exact", "delta"])
def test_feedback_cosine_and_adapter_update_ratio_are_epoch_metrics(rule):
    pair = build(pair_opts(mode="svd", update_rule=rule), recipe=CONTAMINATING["sgd-momentum-wd"])
    for step in range(5):
        take_step(pair, step)
    diag = pair.method.role_metrics()
    adapter = pair.method.epoch_metrics()
    assert "adapter/update_ratio" in pair.method.epoch_metric_names
    assert 0 < adapter["adapter/update_ratio"] < 1
    cos = diag["transfer/0/feedback_cos"]
    assert cos == pytest.approx(1.0, abs=1e-6) if rule == "exact" else -1 <= cos < 0.999


# ---------------------------------------------------------------------------- scale rule


def _top_share(w: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(w)
    return float((s[:r] ** 2).sum() / (s ** 2).sum())


def _untrained_writes(mode: str, output_scale: str, writes: int = 50, gate: bool = False):
    """``writes`` transfers of an untrained adapter (no updates) into the target's conv layer:
    (layer norm / initial, top-4 energy share / initial) after each write."""
    pair = build(pair_opts(mode=mode, layer_pairs=[{"source": CONV, "target": CONV, "mode": mode, "rank": 4,
                                                   "output_scale": output_scale}], adapter={"gate": gate}))
    enc = pair.method.enc[("target", CONV)]
    w0 = enc.dense_matrix().clone()
    out = []
    for step in range(writes):
        transfer(pair, step)
        pair.method.written.clear()
        pair.method.exchange.hub.pending.clear()
        w = enc.dense_matrix()
        out.append((float(w.norm() / w0.norm()), _top_share(w, 4) / _top_share(w0, 4)))
    return out


@pytest.mark.parametrize("mode", ["svd", "learned", "full"])
def test_default_writes_keep_the_layers_norm_over_50_writes(mode):
    """output_scale rms (the default): each write has the norm of the part it replaces, so 50
    writes of an untrained adapter leave the layer's norm where it was (within 2x, in fact 1e-4)."""
    assert MergeNetOptions(**pair_opts()).layer_pairs[0].output_scale == "rms"
    trace = _untrained_writes(mode, "rms")
    assert all(abs(n - 1) < 1e-4 for n, _ in trace), trace[-1]
    if mode == "learned":  # the layer is B A itself: its rank-4 share stays 1
        assert all(abs(s - 1) < 1e-4 for _, s in trace)


def test_unscaled_svd_writes_inflate_the_layer():
    """output_scale none: the LayerNorm output's row norm ~ sqrt(columns) lands in the layer."""
    trace = _untrained_writes("svd", "none", writes=3)
    assert trace[0][0] > 2 and trace[-1][1] > 2


def test_gated_svd_writes_keep_the_spectrum():
    """An untrained gated adapter writes back its input: norm and top-r share unchanged."""
    trace = _untrained_writes("svd", "rms", gate=True)
    assert all(abs(n - 1) < 1e-4 and abs(s - 1) < 1e-3 for n, s in trace), trace[-1]


# ---------------------------------------------------------------------------- adapter learns


def test_adapter_learns_and_reports_metrics():
    pair = build(pair_opts())
    init = adapter_state(pair)
    for step in range(3):
        take_step(pair, step)
    after = adapter_state(pair)
    changed = [k for k in init if not torch.equal(init[k], after[k])]
    assert any(k.endswith("fc_q.weight") for k in changed) and any("ffn" in k for k in changed)
    metrics = pair.method.epoch_metrics()
    assert metrics["adapter/transfers"] == 3 and metrics["adapter/skipped"] == 0
    assert metrics["adapter/grad_norm"] > 0 and metrics["adapter/lr"] > 0
    assert metrics["adapter/generate_ms"] > 0 and metrics["adapter/update_ms"] > 0
    assert pair.method.epoch_metrics()["adapter/transfers"] == 0  # taken per epoch


def test_adapter_optimiser_and_schedule():
    """AdamW (decay on matrices only); cosine schedule stepped once per transfer, from start_epoch."""
    pair = build(pair_opts(t_cycle=2, adapter={"lr": 0.01, "weight_decay": 1e-3, "schedule": "cosine"}))
    hub = pair.method.exchange.hub
    opt = hub.optimizers["0"]
    assert isinstance(opt, torch.optim.AdamW)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and all(p.ndim > 1 for p in decay["params"])
    assert rest["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in rest["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == hub.param_counts()["0"]
    # 1 epoch of 5 steps, t_cycle 2 -> transfers at steps 0, 2, 4: the cosine spans 3 updates
    for step in range(4):
        take_step(pair, step)
    assert hub.schedulers["0"].last_epoch == 2
    assert pair.method.epoch_metrics()["adapter/transfers"] == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))  # 0.0025

    late = build(pair_opts(adapter={"start_epoch": 1}))
    for step in range(3):  # epoch 0: the adapter is updated but its schedule does not move
        take_step(late, step)
    assert late.method.exchange.hub.schedulers["0"].last_epoch == 0
    assert late.method.epoch_metrics()["adapter/transfers"] == 3


@pytest.mark.parametrize("t_cycle,start_epoch", [(1, 0), (2, 1), (3, 1)])
def test_adapter_cosine_spans_exactly_the_transfers_after_start(t_cycle, start_epoch):
    """The cosine ends at 0 on the last transfer (it counts only steps k % t_cycle == 0 from
    start_epoch on; before the fix a start step that was not a transfer step was counted)."""
    pair = build(pair_opts(t_cycle=t_cycle, adapter={"start_epoch": start_epoch, "lr": 0.01}),
                 recipe={"epochs": 2})
    spe = pair.steps_per_epoch
    assert spe == 5
    expected = sum(1 for k in range(start_epoch * spe, 2 * spe) if k % t_cycle == 0)
    assert pair.method.transfers_after_start(spe) == expected
    hub = pair.method.exchange.hub
    for step in range(2 * spe):
        take_step(pair, step)
    assert hub.schedulers["0"].last_epoch == expected
    assert hub.optimizers["0"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_non_transfer_steps_leave_the_target_to_its_optimiser():
    pair = build(pair_opts(t_cycle=3))
    ex = recording(pair)
    for step in range(4):
        take_step(pair, step)
    assert sorted(ex.outputs) == sorted(ex.feedbacks) == [0, 3]


# ---------------------------------------------------------------------------- NaN / Inf


def _poison(pair: PairState, lid: str = "0", value: float = float("nan")) -> None:
    with torch.no_grad():
        pair.method.exchange.hub.adapters[lid].layers[-1].ffn_norm.weight[0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_output_skips_transfer_then_fails(value):
    pair = build(pair_opts(max_bad_transfers=3))
    p = touched(pair, "target", CONV)
    before = p.detach().clone()
    _poison(pair, value=value)
    with pytest.warns(RuntimeWarning, match="non-finite adapter output for link 0 at step 0; transfer skipped"):
        transfer(pair, 0)
    assert torch.equal(p.detach(), before)                      # nothing written
    train(pair, 0)                                              # target still trains normally
    assert not torch.equal(p.detach(), before)
    m = pair.method.epoch_metrics()
    assert m["adapter/skipped"] == 1 and m["adapter/transfers"] == 0
    with pytest.warns(RuntimeWarning, match="non-finite"):
        take_step(pair, 1)
    with pytest.warns(RuntimeWarning), pytest.raises(TransferError) as err:
        take_step(pair, 2)
    msg = str(err.value)
    assert "layer pair 0" in msg and "non-finite" in msg and "3 transfers in a row" in msg
    assert "method.options.adapter.lr" in msg


def test_a_finite_output_resets_the_bad_streak():
    pair = build(pair_opts(max_bad_transfers=2))
    norm = pair.method.exchange.hub.adapters["0"].layers[-1].ffn_norm.weight
    good = norm.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _poison(pair)
        take_step(pair, 0)  # bad (1)
        with torch.no_grad():
            norm.copy_(good)
        take_step(pair, 1)  # good: streak reset
        _poison(pair)
        take_step(pair, 2)  # bad (1 again, not 2)
        with pytest.raises(TransferError, match="2 transfers in a row"):
            take_step(pair, 3)  # bad (2) -> fails
    assert pair.method.exchange.hub.totals == {"transfers": 1, "skipped": 3}


# ---------------------------------------------------------------------------- variants


def test_direction_both_rewrites_both_models():
    pair = build(pair_opts(direction="both"))
    hub = pair.method.exchange.hub
    assert sorted(hub.adapters) == ["0", "0r"]
    ps, pt = touched(pair, "source", CONV), touched(pair, "target", CONV)
    s0, t0 = ps.detach().clone(), pt.detach().clone()
    init = adapter_state(pair)
    ex = recording(pair)
    transfer(pair, 0)
    assert torch.equal(ps.detach(), ex.outputs[0]["0r"]) and not torch.equal(ps.detach(), s0)
    assert torch.equal(pt.detach(), ex.outputs[0]["0"]) and not torch.equal(pt.detach(), t0)
    train(pair, 0)
    assert sorted(ex.feedbacks[0]) == ["0", "0r"]
    after = adapter_state(pair)
    for lid in ("0", "0r"):
        assert any(not torch.equal(init[k], after[k]) for k in init if k.startswith(f"{lid}."))
    assert pair.method.epoch_metrics()["adapter/transfers"] == 2


def test_freeze_source_keeps_source_and_still_transfers():
    pair = build(pair_opts(freeze_source=True))
    assert pair.method.roles(pair.method.options).trained == ("target",) and not pair.roles["source"].trainable
    src_before = {k: v.clone() for k, v in pair.roles["source"].model.state_dict().items()}
    pt = touched(pair, "target", CONV)
    ex = recording(pair)
    for step in range(3):
        take_step(pair, step)
    for k, v in pair.roles["source"].model.state_dict().items():
        assert torch.equal(v, src_before[k]), k
    assert sorted(ex.outputs) == sorted(ex.feedbacks) == [0, 1, 2]
    transfer(pair, 3)
    assert torch.equal(pt.detach(), ex.outputs[3]["0"])
    assert pair.roles["source"].stats["steps"] == 0 and pair.roles["target"].stats["steps"] == 3


def test_several_layer_pairs_one_adapter_each():
    opts = {"t_cycle": 1, "layer_pairs": [
        {"source": CONV, "target": CONV, "mode": "learned", "rank": 4},
        {"source": "hidden.weight", "target": "classifier.weight", "mode": "svd", "rank": 2},
        {"source": "features.0.conv.weight", "target": "features.0.conv.weight", "mode": "full"}]}
    pair = build(opts)
    hub = pair.method.exchange.hub
    assert sorted(hub.adapters) == ["0", "1", "2"]
    assert {k: tuple(v.target_shape) + tuple(v.source_shape) for k, v in hub.adapters.items()} == {
        "0": (4, 72, 4, 72), "1": (2, 32, 2, 16), "2": (8, 9, 8, 9)}
    assert all(n > 0 for n in hub.param_counts().values())
    params = {lid: touched(pair, "target", p) for lid, p in
              [("0", CONV), ("1", "classifier.weight"), ("2", "features.0.conv.weight")]}
    before = {lid: p.detach().clone() for lid, p in params.items()}
    ex = recording(pair)
    transfer(pair, 0)
    for lid, p in params.items():
        assert not torch.equal(p.detach(), before[lid]), lid
    train(pair, 0)
    assert sorted(ex.feedbacks[0]) == ["0", "1", "2"]
    assert pair.method.epoch_metrics()["adapter/transfers"] == 3


def test_self_transfer_inside_one_model():
    pair = build(pair_opts(source="hidden.weight", target="classifier.weight", self_transfer=True), source=None)
    assert set(pair.roles) == {"target"}
    m = pair.method
    assert [(l.provider, l.receiver) for l in m.links] == [("target", "target")]
    assert set(m.enc) == {("target", "hidden.weight"), ("target", "classifier.weight")}
    hub = m.exchange.hub
    assert hub.adapters["0"].target_shape == (4, 32) and hub.adapters["0"].source_shape == (4, 16)
    pc, ph = touched(pair, "target", "classifier.weight"), touched(pair, "target", "hidden.weight")
    h0 = ph.detach().clone()
    ex = recording(pair)
    transfer(pair, 0)
    assert torch.equal(pc.detach(), ex.outputs[0]["0"])
    assert torch.equal(ph.detach(), h0)  # the provider is only read
    train(pair, 0)
    take_step(pair, 1)
    assert sorted(ex.feedbacks) == [0, 1]


def test_self_transfer_shuffled_control_scrambles_the_provider_layer():
    pair = build(pair_opts(source="hidden.weight", target="classifier.weight", self_transfer=True,
                           control="shuffled_source"), source=None)
    m = pair.method
    y = m.enc[("target", "hidden.weight")].read()
    seen = m._control(m.links[0], y)
    assert seen.shape == y.shape and not torch.equal(seen, y)
    assert torch.equal(torch.sort(seen.flatten()).values, torch.sort(y.flatten()).values)  # a permutation


def test_cross_modal_text_source_into_conv_target():
    text = {"name": "rotten_tomatoes", "options": {"train_subset": 200, "test_subset": 50, "max_length": 32}}
    src_param = "bert.encoder.layer.0.attention.output.dense.weight"
    pair = build(pair_opts(source=src_param, target=CONV, adapter={"layers": 1, "heads": 4}),
                 source={"name": "minilm_l3", "options": {"num_layers": 1}}, source_task=text)
    src, tgt = pair.roles["source"], pair.roles["target"]
    assert src.task.info.modality == "text" and tgt.task.info.modality == "image"
    assert len(src.model.bert.encoder.layer) == 1
    hub = pair.method.exchange.hub
    assert hub.adapters["0"].target_shape == (4, 72) and hub.adapters["0"].source_shape == (4, 384)
    conv = tgt.model.features[1].conv
    w0 = conv.weight.detach().clone()
    ex = recording(pair)
    transfer(pair, 0)
    assert torch.equal(conv.A.detach(), ex.outputs[0]["0"])
    assert not torch.equal(conv.weight.detach(), w0)
    train(pair, 0)
    take_step(pair, 1)
    assert sorted(ex.feedbacks) == [0, 1]
    assert src.stats["steps"] == tgt.stats["steps"] == 2
    assert torch.isfinite(conv.weight).all()


# ---------------------------------------------------------------------------- RNG streams


def test_rng_streams_are_private_and_runs_reproducible():
    """Each role and the adapter hub draw from their own streams: the caller's global RNG
    neither influences a run nor is advanced by it."""
    def run(outer_seed: int) -> PairState:
        pair = build(pair_opts(t_cycle=2))
        torch.manual_seed(outer_seed)  # whatever the caller does with the global RNG...
        for step in range(4):
            state = torch.get_rng_state()
            take_step(pair, step)
            assert torch.equal(torch.get_rng_state(), state)  # ...a step leaves it alone
        return pair

    a = run(1)
    hub_rng = a.method.exchange.hub.rng.cpu.clone()
    take_step(a, 4)  # a transfer: the adapter's dropout drew from the hub's stream
    assert not torch.equal(a.method.exchange.hub.rng.cpu, hub_rng)
    b = run(2)
    take_step(b, 4)
    sa, sb = a.roles["target"].model.state_dict(), b.roles["target"].model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    aa, ab = adapter_state(a), adapter_state(b)
    assert all(torch.equal(aa[k], ab[k]) for k in aa)


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("side", ["source", "target"])
def test_layer_pair_naming_a_missing_parameter(side):
    lp = {"source": CONV, "target": CONV, side: "features.9.conv.weight"}
    with pytest.raises(ConfigError) as err:
        build(pair_opts(**lp))
    assert err.value.field == f"method.options.layer_pairs.0.{side}"
    assert "no parameter 'features.9.conv.weight'" in str(err.value)


def test_second_layer_pair_error_names_its_index():
    opts = {"layer_pairs": [{"source": CONV, "target": CONV},
                            {"source": "hidden.weight", "target": "classifier.bias"}]}
    with pytest.raises(ConfigError) as err:
        build(opts)
    assert err.value.field == "method.options.layer_pairs.1.target"


@pytest.mark.parametrize("mode", ["learned", "svd"])
def test_rank_too_large(mode):
    # classifier.weight is 10x32 (rank <= 10); hidden.weight is 32x16 (rank <= 16)
    with pytest.raises(ConfigError) as err:
        build(pair_opts(source="hidden.weight", target="classifier.weight", mode=mode, rank=12))
    assert err.value.field == "method.options.layer_pairs.0.target"
    assert "rank 12 is invalid" in str(err.value) and "1..10" in str(err.value)


def test_invalid_option_combinations_are_config_errors():
    from mergenet_core.config import ConfigErrors

    with pytest.raises(ConfigErrors, match="freeze_source"):
        make_cfg(pair_opts(freeze_source=True, direction="both"))
    with pytest.raises(ConfigErrors, match="source"):
        make_cfg(pair_opts(), source=None)  # no source and no self_transfer


# ---------------------------------------------------------------------------- adapter size


def test_authors_full_mode_pairing_adapter_size():
    """ResNet-50 fc (100x2048) -> MobileNetV2 features.16.project (160x960), full mode: ~37.6 M."""
    info = TaskInfo("cifar100-shape", "image", 100, in_channels=3, image_size=32)
    torch.manual_seed(0)
    r50, mbv2 = build_model("resnet50", {}, info), build_model("mobilenetv2", {}, info)
    opts = MergeNetOptions(layer_pairs=[{"source": "fc.weight", "target": "features.16.project.conv.weight",
                                         "mode": "full"}])
    src = make_encoding(r50, "fc.weight", "full")
    tgt = make_encoding(mbv2, "features.16.project.conv.weight", "full")
    assert tuple(src.shape) == (100, 2048) and tuple(tgt.shape) == (160, 960)
    assert tuple(mbv2.features[16].project.conv.weight.shape) == (160, 960, 1, 1)
    hub = AdapterHub(opts, {"0": (tuple(tgt.shape), tuple(src.shape))}, make_links(opts), seed=0,
                     transfers_after_start=1)
    n = hub.param_counts()["0"]
    assert n == 37_633_928
    assert n == pytest.approx(37.6e6, rel=0.002)
    mbv2_params = sum(p.numel() for p in mbv2.parameters())
    assert 15 < n / mbv2_params < 17  # "16x the MobileNetV2 it writes into"


# ---------------------------------------------------------------------------- async exchange


def async_pair(staleness_steps: int = 1) -> tuple[PairState, Exchange]:
    """A tiny pair whose method talks to an async :class:`Exchange` (background adapter thread)
    around a hub built exactly like the engine's (same seed -> same initial adapter)."""
    pair = build(pair_opts(adapter={"attn_dropout": 0.0, "ffn_dropout": 0.0}))
    ex = Exchange(pair.method.exchange.hub, staleness_steps=staleness_steps)
    pair.method.attach(ex)
    return pair, ex


def test_async_receiver_never_waits_for_the_adapter_in_progress():
    """Staleness 1 at t_cycle 1: the first transfer waits (nothing to use yet); at the next
    step the output in progress is not waited for -- the role trains on without a write --
    and from then on each step writes the output generated from the previous step's factors."""
    pair, ex = async_pair(1)
    m, tgt = pair.method, pair.roles["target"]
    transfer(pair, 0)
    assert set(m.written) == {"0"} and m.written["0"][2] == 0
    train(pair, 0)
    ex.take_epoch_metrics()  # the adapter thread has applied step 0's update
    with ex._cv:  # hold the exchange's (re-entrant) lock: the adapter thread cannot start step 1's generation
        transfer(pair, 1)
        assert m.written == {} and ex._jobs and ex._jobs[0][:2] == ("generate", 1)
    train(pair, 1)
    for step in (2, 3):
        ex.take_epoch_metrics()  # let the adapter thread finish what is queued
        transfer(pair, step)
        assert m.written["0"][2] == step - 1  # one transfer old, never older
        train(pair, step)
    ex.take_epoch_metrics()
    assert ex.hub.totals == {"transfers": 4, "skipped": 0}  # generations at steps 0-3
    assert not ex.hub.pending.keys() - {(3, "0")}  # only the latest output still awaits its use
    assert tgt.model.training


def test_async_update_takes_the_gradient_at_the_generating_parameters():
    """Two outputs generated before either update (the async pipeline). The second update's
    gradient is the one at the parameters that generated it, although the first update
    moved the adapter in between (a graph through the live parameters would see them moved)."""
    hub = build(pair_opts(adapter={"attn_dropout": 0.0, "ffn_dropout": 0.0})).method.exchange.hub
    ad = hub.adapters["0"]
    (p, q), (P, Q) = ad.target_shape, ad.source_shape
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(p, q, generator=g), torch.randn(P, Q, generator=g)
    g0, g1 = torch.randn(p, q, generator=g), torch.randn(p, q, generator=g)
    before = {n: t.detach().clone() for n, t in ad.named_parameters()}

    hub.generate(0, {"0": (x, y)}, snapshot=True)
    # reference: gradient of <out, g1> at the initial parameters (and the spectral-norm
    # power-iteration buffers as the second generation finds them)
    ref = copy.deepcopy(ad)
    (ref(x, y, reference=x) * g1).sum().backward()
    want = {n: t.grad.clone() for n, t in ref.named_parameters() if t.grad is not None}
    hub.generate(1, {"0": (x, y)}, snapshot=True)
    assert all(torch.equal(t, before[n]) for n, t in ad.named_parameters())
    hub.update(0, {"0": g0}, epoch=0)
    assert not all(torch.equal(t, before[n]) for n, t in ad.named_parameters())
    hub.optimizers["0"].step = lambda *a, **k: None  # keep .grad for inspection (no optimiser step)
    hub.update(1, {"0": g1}, epoch=0)
    got = {n: t.grad for n, t in ad.named_parameters() if t.grad is not None}
    assert got.keys() == want.keys()
    scale = min(1.0, hub.opts.adapter.grad_clip / float(torch.sqrt(sum((w ** 2).sum() for w in want.values()))))
    for n in want:
        torch.testing.assert_close(got[n], want[n] * scale, rtol=1e-4, atol=1e-6)



def test_async_first_update_equals_sync():
    """With one generation and its update, snapshot and in-place generation are the same update."""
    a = build(pair_opts(adapter={"attn_dropout": 0.0, "ffn_dropout": 0.0})).method.exchange.hub
    b = build(pair_opts(adapter={"attn_dropout": 0.0, "ffn_dropout": 0.0})).method.exchange.hub
    ad = a.adapters["0"]
    (p, q), (P, Q) = ad.target_shape, ad.source_shape
    x, y, g0 = torch.randn(p, q), torch.randn(P, Q), torch.randn(p, q)
    out_a = a.generate(0, {"0": (x, y)}, snapshot=True)["0"]
    out_b = b.generate(0, {"0": (x, y)})["0"]
    torch.testing.assert_close(out_a, out_b)
    a.update(0, {"0": g0}, epoch=0)
    b.update(0, {"0": g0}, epoch=0)
    for (n, ta), tb in zip(a.adapters["0"].named_parameters(), b.adapters["0"].parameters()):
        torch.testing.assert_close(ta, tb, msg=n)


def test_async_adapter_error_reaches_the_roles():
    """A failure on the adapter thread is raised to the next role call, not swallowed."""
    pair, ex = async_pair(1)
    transfer(pair, 0)
    train(pair, 0)
    ex.feedback(99, {"0": torch.zeros(3)}, 0)  # no pending output for step 99: ignored, not an error
    ex.feedback(0, {"0": torch.zeros(3)}, 0)  # already consumed: ignored as well
    ex.put(1, {("0", "x"): torch.zeros(2, 2), ("0", "y"): torch.zeros(2, 2)})  # wrong shapes
    with pytest.raises(ValueError, match="adapter expects"):
        ex.take_epoch_metrics()
    with pytest.raises(ValueError, match="adapter expects"):
        ex.get(1, "target")
