"""Tests for mergenet_core.methods.mergenet.adapter (spec section 4)."""
from __future__ import annotations

import pytest
import torch

from mergenet_core.methods.mergenet.adapter import (CrossAttention, KnowledgeTransferLayer, ParameterAdapter,
                                   adapter_param_count, head_width)
from mergenet_core.lowrank import rms


@pytest.mark.parametrize("target,source", [((4, 27), (4, 64)), ((3, 10), (7, 5)),
                                           ((6, 6), (2, 40)), ((1, 9), (4, 4))])
@pytest.mark.parametrize("layers", [1, 2])
def test_shape_contract(target, source, layers):
    torch.manual_seed(0)
    adapter = ParameterAdapter(target, source, layers=layers, heads=4)
    out = adapter(torch.randn(target), torch.randn(source))
    assert out.shape == target and torch.isfinite(out).all()
    assert len(adapter.layers) == layers
    with pytest.raises(ValueError):
        adapter(torch.randn(source), torch.randn(target))
    # rows of the last LayerNorm output: zero mean, unit variance (LN affine at init)
    if target[1] > 1:
        assert torch.allclose(out.mean(1), torch.zeros(target[0]), atol=1e-4)


def test_head_width_rule_and_projection_dims():
    assert head_width(960, 2048, 8) == 188
    assert head_width(4, 4, 8) == 16  # floor of 128
    att = CrossAttention(960, 100, heads=8)
    assert att.fc_q.weight.shape == (8 * 66, 960)
    assert att.fc_k.weight.shape == (528, 100) and att.fc_v.weight.shape == (528, 100)
    assert att.fc_o.weight.shape == (960, 528)


def test_combination_weights_init_equal():
    ktl = KnowledgeTransferLayer((4, 10), (3, 12), heads=2)
    assert torch.allclose(ktl.combination_weights(), torch.full((4,), 0.25))


def test_combination_is_the_weighted_sum_of_the_four_attentions():
    torch.manual_seed(0)
    ktl = KnowledgeTransferLayer((4, 10), (3, 12), heads=2).eval()
    with torch.no_grad():
        ktl.mix.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    x, y = torch.randn(4, 10), torch.randn(3, 12)
    w = torch.softmax(ktl.mix, 0)
    z = (w[0] * ktl.att_rr(x, y) + w[1] * ktl.att_rc(x, y.t()) + w[2] * ktl.att_cr(x.t(), y).t()
         + w[3] * ktl.att_cc(x.t(), y.t()).t())
    ref = ktl.ffn_norm(z + ktl.ffn_down(torch.nn.functional.gelu(ktl.ffn_up(z))))
    assert torch.allclose(ktl(x, y), ref, atol=1e-5)


def test_authors_full_matrix_pairing_parameter_count():
    adapter = ParameterAdapter((160, 960), (100, 2048), layers=2, heads=8)
    n = adapter_param_count(adapter)
    assert abs(n - 37.6e6) / 37.6e6 < 0.02, n
    assert n == 37_633_928  # 37_633_920 of the authors' layout + 2 x 4 mixing weights


@pytest.mark.parametrize("target,source", [((4, 27), (4, 64)), ((3, 10), (5, 7))])
def test_rms_output_scale(target, source):
    torch.manual_seed(0)
    ref = 0.02 * torch.randn(target)
    adapter = ParameterAdapter(target, source, heads=2, output_scale="rms")
    out = adapter(torch.randn(target), torch.randn(source), reference=ref)
    assert torch.allclose(rms(out), rms(ref), rtol=1e-5)
    x = 0.05 * torch.randn(target)  # without a reference: the RMS of the matrix it rewrites
    assert torch.allclose(rms(adapter(x, torch.randn(source))), rms(x), rtol=1e-5)
    assert ParameterAdapter(target, source, heads=2).output_scale == "rms"  # one default everywhere


def test_learned_output_scale_initialised_from_first_reference():
    torch.manual_seed(0)
    adapter = ParameterAdapter((4, 27), (4, 64), heads=2, output_scale="learned").eval()
    x, y, ref = torch.randn(4, 27), torch.randn(4, 64), 0.05 * torch.randn(4, 27)
    out = adapter(x, y, reference=ref)
    assert torch.allclose(rms(out), rms(ref), rtol=1e-5)
    scale = adapter.scale.detach().clone()
    adapter(x, y, reference=10 * ref)  # initialised once, then learned
    assert torch.equal(adapter.scale.detach(), scale)
    state = adapter.state_dict()
    assert bool(state["scale_initialised"])


@pytest.mark.parametrize("output_scale", ["none", "rms", "learned"])
def test_gradients_reach_every_parameter(output_scale):
    torch.manual_seed(0)
    adapter = ParameterAdapter((4, 27), (6, 16), layers=2, heads=4, output_scale=output_scale)
    x, y, ref = torch.randn(4, 27), torch.randn(6, 16), 0.1 * torch.randn(4, 27)
    out = adapter(x, y, reference=ref)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_delta_rule_gradient_is_vector_jacobian_product():
    """autograd.grad(out, params, grad_outputs=Delta) == grad of <out, Delta>."""
    torch.manual_seed(0)
    adapter = ParameterAdapter((4, 12), (4, 20), heads=2).eval()
    x, y = torch.randn(4, 12), torch.randn(4, 20)
    delta = torch.randn(4, 12)
    out = adapter(x, y)
    g1 = torch.autograd.grad(out, list(adapter.parameters()), grad_outputs=delta)
    g2 = torch.autograd.grad((adapter(x, y) * delta).sum(), list(adapter.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)


def test_cpu_attention_dropout_drops_p_of_the_weights_and_is_unbiased():
    """``attend`` with dropout on CPU (its own mask path): without dropout it is SDPA; with
    dropout p it zeroes about p of the attention weights and is unbiased on average."""
    import torch.nn.functional as F

    from mergenet_core.methods.mergenet.adapter import attend

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g)
    torch.testing.assert_close(attend(q, k, torch.eye(7).expand(1, 2, 7, 7)),
                               F.scaled_dot_product_attention(q, k, torch.eye(7).expand(1, 2, 7, 7)))
    ident = torch.eye(7).expand(1, 2, 7, 7)  # v = I: the output is the (dropped, rescaled) weight map
    torch.manual_seed(0)
    draws = torch.stack([attend(q, k, ident, 0.25) for _ in range(4000)])
    assert abs(float((draws == 0).float().mean()) - 0.25) < 0.01
    torch.testing.assert_close(draws.mean(0), attend(q, k, ident), atol=0.01, rtol=0.05)


def test_source_anchor_with_open_gate_writes_the_source_matrix_then_learns_to_depart():
    """anchor: source, gate_init 1: an untrained adapter proposes (and writes) the source's matrix;
    its departure scalar gets a gradient, so training can move away from the copy."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 10), 3 * torch.randn(6, 10)
    ad = ParameterAdapter((6, 10), (6, 10), layers=1, heads=2, output_scale="none", gate=True, gate_init=1.0,
                          anchor="source")
    out = ad(x, y)
    assert torch.allclose(out, y, atol=1e-6)
    scaled = ParameterAdapter((6, 10), (6, 10), layers=1, heads=2, gate=True, gate_init=1.0, anchor="source")(x, y)
    assert torch.allclose(scaled / rms(scaled), y / rms(y), atol=1e-5) and torch.isclose(rms(scaled), rms(x))
    (out * torch.randn_like(out)).sum().backward()
    assert ad.depart.grad is not None and float(ad.depart.grad.abs()) > 0 and ad.gate.grad is not None
    with pytest.raises(ValueError, match="anchor"):
        ParameterAdapter((6, 10), (8, 10), layers=1, heads=2, anchor="source")


def test_gate_init_needs_the_gate():
    from mergenet_core.methods.mergenet.options import AdapterOptions

    with pytest.raises(ValueError, match="gate_init"):
        AdapterOptions(gate_init=1.0)
    assert AdapterOptions(gate=True, gate_init=1.0, anchor="source").anchor == "source"


def test_feeds_swap_the_source_matrix_one_place_at_a_time():
    """``feeds`` (the probe's ablation): no feeds = the plain call; the same matrix fed in every
    place = the call with that matrix; one block fed changes the output, and ``anchor`` only
    on a source-anchored adapter."""
    from mergenet_core.methods.mergenet.adapter import BLOCKS

    torch.manual_seed(0)
    x, y, y2 = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 10)
    for anchor in ("target", "source"):
        ad = ParameterAdapter((6, 10), (6, 10), layers=2, heads=2, gate=True, gate_init=0.5, anchor=anchor).eval()
        with torch.no_grad():
            if anchor == "source":
                ad.depart.fill_(0.5)  # from 0 the proposal is the anchor alone: the blocks would not show
            base = ad(x, y)
            torch.testing.assert_close(ad(x, y, feeds={}), base)
            places = [*BLOCKS] + (["anchor"] if anchor == "source" else [])
            torch.testing.assert_close(ad(x, y, feeds={p: y2 for p in places}), ad(x, y2))
            for p in BLOCKS:
                assert not torch.allclose(ad(x, y, feeds={p: y2}), base)
