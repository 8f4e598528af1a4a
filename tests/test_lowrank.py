"""Tests for mergenet_core.lowrank: layout, factorised layers, encodings, delta identity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergenet_core.errors import ConfigError
from mergenet_core.lowrank import (LowRankConv2d, LowRankLinear, conv_to_matrix, make_encoding,
                                   matrix_to_weight, rms, rms_rescale, truncated_svd_factors)

MODES = ["learned", "svd", "full"]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=1)
        self.body = nn.Sequential(nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False), nn.ReLU())
        self.norm = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.body(F.relu(self.conv(x)))
        return self.fc(torch.flatten(self.norm(x), 1))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().double()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (4,), generator=g))


# ------------------------------------------------------------------------- layout
def test_reshape_round_trip_conv_and_linear():
    w = torch.randn(8, 3, 3, 5)
    m = conv_to_matrix(w)
    assert m.shape == (8, 45)
    assert torch.equal(m[2, 5 * 3 + 2], w[2, 1, 0, 2])  # row-major over (in, kh, kw)
    assert torch.equal(matrix_to_weight(m, w.shape), w)
    lin = torch.randn(7, 4)
    assert torch.equal(conv_to_matrix(lin), lin)
    assert torch.equal(matrix_to_weight(conv_to_matrix(lin), lin.shape), lin)
    with pytest.raises(ValueError):
        matrix_to_weight(m, (8, 3, 3, 4))


# ------------------------------------------------------------------ factorised layers
@pytest.mark.parametrize("alpha", [None, 8.0])
def test_lowrank_linear_forward_matches_dense(alpha):
    torch.manual_seed(0)
    layer = LowRankLinear(10, 6, rank=3, alpha=alpha)
    with torch.no_grad():
        layer.A.normal_(), layer.B.normal_()
    x = torch.randn(5, 10)
    w = layer.B @ layer.A * (layer.alpha / 3)
    assert torch.allclose(layer(x), F.linear(x, w, layer.bias), atol=1e-5)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(padding=2, dilation=2),
                                dict(groups=2, padding="same")])
def test_lowrank_conv_forward_matches_dense(kw):
    torch.manual_seed(0)
    layer = LowRankConv2d(4, 6, 3, rank=2, alpha=4.0, **kw)
    with torch.no_grad():
        layer.A.normal_(), layer.B.normal_()
    x = torch.randn(2, 4, 9, 9)
    w = (layer.B @ layer.A * 2.0).reshape(6, 4 // layer.groups, 3, 3)
    ref = F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_svd_init_is_best_rank_r_and_exact_at_full_rank():
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3).double()
    m = conv_to_matrix(dense.weight.detach())
    s = torch.linalg.svdvals(m)
    for r in (2, 6):
        low = LowRankConv2d.from_dense(dense, rank=r, alpha=3.0)
        err = (conv_to_matrix(low.weight.detach()) - m).norm()
        assert torch.allclose(err, s[r:].norm(), atol=1e-10)  # Eckart-Young optimum
        assert low.bias is dense.bias
    lin = nn.Linear(5, 7).double()
    full = LowRankLinear.from_dense(lin, rank=5, alpha=1.0)
    assert torch.allclose(full.weight, lin.weight, atol=1e-10)
    b, a = truncated_svd_factors(m, 6)
    assert torch.allclose(b @ a, m, atol=1e-10)


def test_learned_encoding_swaps_module_and_keeps_forward_at_full_rank():
    model = tiny()
    x, _ = batch()
    ref = model.eval()(x)
    enc = make_encoding(model, "conv.weight", "learned", rank=8)  # rank 8 = full rank (8x27)
    assert isinstance(model.conv, LowRankConv2d) and enc.param_path == "conv.A"
    assert enc.shape == (8, 27)
    assert torch.allclose(model(x), ref, atol=1e-8)
    assert model.get_parameter("conv.A") is enc.parameters_touched()[0]
    # a second request for the same layer reuses it; a different rank is refused
    assert make_encoding(model, "conv.weight", "learned", rank=8).layer is model.conv
    with pytest.raises(ConfigError):
        make_encoding(model, "conv.weight", "learned", rank=4)


# --------------------------------------------------------------------- encodings
@pytest.mark.parametrize("mode", MODES)
def test_read_write_round_trip(mode):
    model = tiny()
    enc = make_encoding(model, "body.0.weight", mode, rank=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = enc.read()
    assert a.shape == enc.shape and not a.requires_grad
    assert enc.shape == ((3, 72) if mode != "full" else (6, 72))
    enc.write(a)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-12), k
    new = torch.randn(enc.shape, dtype=torch.float64)
    enc.write(new)
    if mode != "svd":  # svd re-factorises; see the two svd tests below
        assert torch.allclose(enc.read(), new, atol=1e-12)
    with pytest.raises(ValueError):
        enc.write(torch.zeros(2, 2, dtype=torch.float64))


def test_svd_read_after_write_recovers_new_when_new_is_consistent():
    model = tiny()
    enc = make_encoding(model, "fc.weight", "svd", rank=2)
    a = enc.read()
    enc.write(2 * a)  # W + B A = W + U_2 S_2 V_2^T: doubles the top-2 singular values
    assert torch.allclose(enc.read().abs(), (2 ** 0.5 * a).abs(), atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_write_keeps_parameter_and_momentum(mode):
    model = tiny()
    enc = make_encoding(model, "fc.weight", mode, rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    (p,) = enc.parameters_touched()
    buf = opt.state[p]["momentum_buffer"].clone()
    enc.write(enc.read() + 0.5)
    assert enc.parameters_touched()[0] is p
    assert p is model.get_parameter(enc.param_path)
    assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # still works with the surviving state


def test_svd_write_keeps_component_outside_top_r():
    model = tiny()
    enc = make_encoding(model, "body.0.weight", "svd", rank=2)
    w0 = conv_to_matrix(model.body[0].weight.detach()).clone()
    a = enc.read()
    b, _ = enc.factors
    enc.write(a + torch.randn_like(a))
    w1 = conv_to_matrix(model.body[0].weight.detach())
    u = torch.linalg.svd(w0, full_matrices=False)[0][:, :2]
    outside = torch.eye(6, dtype=w0.dtype) - u @ u.t()
    assert torch.allclose(outside @ w1, outside @ w0, atol=1e-10)
    assert not torch.allclose(w1, w0)
    assert torch.allclose(b.t() @ b, torch.diag(torch.linalg.svdvals(w0)[:2]), atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["body.0.weight", "fc.weight"])
def test_override_matches_write(mode, name):
    model = tiny().eval()
    enc = make_encoding(model, name, mode, rank=3)
    x, _ = batch()
    new = enc.read() + 0.1 * torch.randn(enc.shape, dtype=torch.float64)
    out_override = functional_call(model, enc.override(new), (x,))
    enc.write(new)
    assert torch.allclose(out_override, model(x), atol=1e-10)
    assert torch.allclose(functional_call(model, enc.override(new), (x,)), model(x), atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["body.0.weight", "fc.weight"])
def test_delta_equals_lr_times_exact_gradient(mode, name):
    """delta rule vs exact rule under plain SGD: delta(new) == lr * dL/dnew."""
    lr = 0.05
    model = tiny()
    enc = make_encoding(model, name, mode, rank=3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = batch()
    torch.manual_seed(3)
    new = (enc.read() + 0.1 * torch.randn(enc.shape, dtype=torch.float64)).requires_grad_()
    # exact: gradient of the target loss w.r.t. the generated matrix
    loss = F.cross_entropy(functional_call(model, enc.override(new), (x,)), y)
    (grad,) = torch.autograd.grad(loss, new)
    # delta: write, one optimiser step on the same batch, then Delta
    enc.write(new.detach())
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    d = enc.delta(new.detach())
    assert d.shape == new.shape
    assert grad.abs().max() > 0
    assert torch.allclose(d, lr * grad, atol=1e-10, rtol=1e-7)


# ------------------------------------------------------------------- validation
def test_config_errors():
    model = tiny()
    with pytest.raises(ConfigError, match="model has no parameter 'nope.weight'") as e:
        make_encoding(model, "nope.weight", "svd", field="layer_pairs[0].target")
    assert e.value.field == "layer_pairs[0].target"
    with pytest.raises(ConfigError, match="model has no parameter"):
        make_encoding(model, "fc.wieght", "learned")
    with pytest.raises(ConfigError, match="rank") as e:
        make_encoding(model, "fc.weight", "learned", rank=6)  # fc is 5x96
    assert e.value.field == "layer_pairs"
    with pytest.raises(ConfigError, match="rank"):
        make_encoding(model, "body.0.weight", "svd", rank=0)
    with pytest.raises(ConfigError, match="shape"):
        make_encoding(model, "fc.bias", "full")
    with pytest.raises(ConfigError, match="shape"):
        make_encoding(model, "norm.weight", "learned")
    with pytest.raises(ConfigError, match="mode"):
        make_encoding(model, "fc.weight", "lora")
    assert make_encoding(model, "fc.weight", "full", rank=999).shape == (5, 96)  # rank unused
    assert isinstance(model.fc, nn.Linear)  # failed attempts changed nothing


def test_learned_rejects_non_module_weights():
    model = nn.Sequential(nn.Embedding(10, 6))
    with pytest.raises(ConfigError, match="learned"):
        make_encoding(model, "0.weight", "learned", rank=2)
    assert make_encoding(model, "0.weight", "svd", rank=2).shape == (2, 6)


def test_rms_rescale():
    g = torch.randn(4, 30, requires_grad=True)
    ref = 0.03 * torch.randn(4, 30)
    out = rms_rescale(g, ref)
    assert torch.allclose(rms(out), rms(ref))
    out.sum().backward()
    assert g.grad is not None
