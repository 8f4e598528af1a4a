"""The low-rank parametric knowledge adapter (spec section 4).

``X [p, q]`` is the target matrix, ``Y [P, Q]`` the source matrix. Tokens are rows
(``X``: p tokens of width q) or columns (``X^T``: q tokens of width p). Queries come from the
target, keys/values from the source. See docs/METHOD.md, "Adapter".
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ...lowrank import rms

OutputScale = Literal["none", "rms", "learned"]
Combine = Literal["learned", "mean"]
Gelu = Literal["erf", "tanh"]
BLOCKS = ("rr", "rc", "cr", "cc")  # the KTL's four cross attentions, as ``feeds`` names them

__all__ = ["head_width", "attend", "CrossAttention", "KnowledgeTransferLayer", "ParameterAdapter",
           "adapter_param_count"]


def head_width(d_q: int, d_kv: int, heads: int, width: int | None = None) -> int:
    """Per-head width ``max((d_q + d_kv) // 2, 128) // heads`` (the authors' rule), or
    ``width // heads`` for a fixed model width (``adapter.width``)."""
    d = (width if width else max((d_q + d_kv) // 2, 128)) // heads
    if d < 1:
        raise ValueError(f"heads={heads} leaves a per-head width of 0")
    return d


def attend(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """``Dropout_p(softmax(q k^T / sqrt(d))) v`` -- scaled dot-product attention with dropout on
    the attention weights. On CPU with dropout the mask comes from ``torch.rand``: SDPA's CPU
    dropout path (``bernoulli_`` and masking) was the largest cost of a CPU adapter step on the
    ``[heads, columns, columns]`` maps of the column attentions. Otherwise: SDPA."""
    if dropout > 0 and q.device.type == "cpu":
        w = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        keep = torch.rand_like(w) >= dropout
        return (w * keep * (1.0 / (1.0 - dropout))) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


def _spectral_norm(layer: nn.Linear) -> nn.Module:
    """``spectral_norm(layer)``; a layer on the ``meta`` device (fast validation builds the
    adapters for their errors; only shapes exist) stays plain: the norm's power iteration would
    be the one computation on meta tensors, and its first one loads torch's Python meta kernels
    (about a second). The trainable parameters are the same either way."""
    return layer if layer.weight.is_meta else spectral_norm(layer)


class CrossAttention(nn.Module):
    """``LayerNorm(q + W_o MHA(q W_q, kv W_k, kv W_v))``; all projections with bias, total
    width ``heads * head_width(d_q, d_kv, heads)``; dropout on the attention weights."""

    def __init__(self, d_q: int, d_kv: int, heads: int = 8, dropout: float = 0.1, ln_eps: float = 1e-5,
                 width: int | None = None):
        super().__init__()
        self.heads, self.d = heads, head_width(d_q, d_kv, heads, width)
        inner = heads * self.d
        self.fc_q = nn.Linear(d_q, inner)
        self.fc_k = nn.Linear(d_kv, inner)
        self.fc_v = nn.Linear(d_kv, inner)
        self.fc_o = nn.Linear(inner, d_q)
        self.norm = nn.LayerNorm(d_q, eps=ln_eps)
        self.dropout = dropout

    def forward(self, q_tokens: Tensor, kv_tokens: Tensor) -> Tensor:
        h, d = self.heads, self.d
        q = self.fc_q(q_tokens).view(1, -1, h, d).transpose(1, 2)   # [1, h, n_q, d]
        k = self.fc_k(kv_tokens).view(1, -1, h, d).transpose(1, 2)  # [1, h, n_kv, d]
        v = self.fc_v(kv_tokens).view(1, -1, h, d).transpose(1, 2)
        att = attend(q, k, v, self.dropout if self.training else 0.0)
        out = att[0].transpose(0, 1).reshape(q_tokens.shape[0], h * d)
        return self.norm(q_tokens + self.fc_o(out))


class KnowledgeTransferLayer(nn.Module):
    """One KTL: four cross attentions (rows/columns of X against rows/columns of Y), their
    combination, then the row-wise FFN ``q -> 2q -> q`` (GELU, spectral norm on both linears,
    dropout, residual + LayerNorm).

    ``combine``: ``learned`` mixes with ``softmax`` of a learnable 4-vector initialised to
    zeros (equal weights); ``mean`` is the authors' fixed plain mean (no mixing parameters).
    ``gelu``: ``erf`` (exact) or ``tanh`` (the authors' approximation). ``ln_eps``: the
    LayerNorms' epsilon (authors: 1e-12).
    """

    def __init__(self, target_shape: tuple[int, int], source_shape: tuple[int, int],
                 heads: int = 8, attn_dropout: float = 0.1, ffn_dropout: float = 0.2,
                 combine: Combine = "learned", gelu: Gelu = "erf", ln_eps: float = 1e-5,
                 width: int | None = None):
        super().__init__()
        if combine not in ("learned", "mean") or gelu not in ("erf", "tanh"):
            raise ValueError(f"combine must be learned|mean and gelu erf|tanh, got {combine!r}, {gelu!r}")
        (p, q), (P, Q) = target_shape, source_shape
        self.target_shape, self.source_shape = (p, q), (P, Q)
        self.att_rr = CrossAttention(q, Q, heads, attn_dropout, ln_eps, width)  # target rows x source rows
        self.att_rc = CrossAttention(q, P, heads, attn_dropout, ln_eps, width)  # target rows x source columns
        self.att_cr = CrossAttention(p, Q, heads, attn_dropout, ln_eps, width)  # target columns x source rows
        self.att_cc = CrossAttention(p, P, heads, attn_dropout, ln_eps, width)  # target columns x source columns
        self.combine = combine
        if combine == "learned":
            self.mix = nn.Parameter(torch.zeros(4))  # softmax(0) = equal weights = plain mean
        self.gelu = "tanh" if gelu == "tanh" else "none"
        hidden = width if width else 2 * q  # the authors' q -> 2q -> q, or the fixed model width
        self.ffn_up = _spectral_norm(nn.Linear(q, hidden))
        self.ffn_down = _spectral_norm(nn.Linear(hidden, q))
        self.ffn_dropout = nn.Dropout(ffn_dropout)
        self.ffn_norm = nn.LayerNorm(q, eps=ln_eps)

    def combination_weights(self) -> Tensor:
        """Weights of (O_rr, O_rc, O_cr, O_cc): ``softmax(mix)``, or 1/4 each (``mean``)."""
        if self.combine == "mean":
            return torch.full((4,), 0.25, device=self.ffn_norm.weight.device)
        return torch.softmax(self.mix, dim=0)

    def forward(self, x: Tensor, y: Tensor, feeds: Mapping[str, Tensor] | None = None) -> Tensor:
        """``feeds`` (an ablation): the source matrix one block sees instead of ``y``, by block
        name ``rr`` / ``rc`` / ``cr`` / ``cc``."""
        feeds = feeds or {}
        y_rr, y_rc, y_cr, y_cc = (feeds.get(k, y) for k in BLOCKS)
        xt = x.t()
        w = self.combination_weights()
        z = (w[0] * self.att_rr(x, y_rr) + w[1] * self.att_rc(x, y_rc.t())
             + w[2] * self.att_cr(xt, y_cr).t() + w[3] * self.att_cc(xt, y_cc.t()).t())
        ffn = self.ffn_down(F.gelu(self.ffn_up(z), approximate=self.gelu))
        return self.ffn_norm(z + self.ffn_dropout(ffn))


class ParameterAdapter(nn.Module):
    """``L`` stacked KTLs mapping a target matrix ``X [p, q]`` (and source ``Y [P, Q]``) to a
    new target matrix ``X' [p, q]``.

    ``output_scale``: ``rms`` (the default, as for a layer pair) keeps the layer's scale: the
    output gets the RMS of ``reference`` (the matrix being replaced; ``x`` when not given) --
    measured through ``metric`` ``G = B^T B`` when given (svd and learned factors), so that the
    written part ``B X'`` has exactly the Frobenius norm of the part ``B X`` it replaces
    (``||B X||^2 = sum((G X) * X)``); without it, the RMS of the matrix itself (full mode);
    ``none`` returns the last LayerNorm's output (rows zero-mean, unit variance: a row norm of
    about sqrt(q) whatever the layer's scale -- on svd factors this inflates the layer's top-r
    part at every write, docs/METHOD.md "Scale rule");
    ``learned`` multiplies by a learnable scalar, initialised on the first call that has a
    ``reference`` so that the output RMS equals the reference RMS (1 until then).

    ``gate``: the output is ``X + g (X' - X)`` with a learnable scalar ``g`` initialised to
    ``gate_init`` (0: an untrained adapter rewrites nothing and the adapter only moves the target
    as far as its feedback -- the target's own loss -- says the proposal helps).

    ``anchor``: what the proposal ``X'`` starts from. ``target`` (the method's): the KTL stack's
    output. ``source``: ``Y + d (KTL(X, Y) - Y)`` with a learnable scalar ``d`` initialised to 0,
    so that an untrained adapter proposes the source's matrix itself and learns how far to depart
    from it (needs equal shapes; with ``gate_init: 1`` the first write copies the source's
    matrix, at the layer's scale under ``output_scale: rms``: docs/METHOD.md, "Why MergeNet's
    writes lose where a transplant gains").
    """

    def __init__(self, target_shape: tuple[int, int], source_shape: tuple[int, int],
                 layers: int = 2, heads: int = 8, attn_dropout: float = 0.1,
                 ffn_dropout: float = 0.2, output_scale: OutputScale = "rms",
                 combine: Combine = "learned", gelu: Gelu = "erf", ln_eps: float = 1e-5,
                 width: int | None = None, gate: bool = False, anchor: str = "target", gate_init: float = 0.0):
        super().__init__()
        if anchor not in ("target", "source"):
            raise ValueError(f"anchor must be target or source, got '{anchor}'")
        if anchor == "source" and tuple(target_shape) != tuple(source_shape):
            raise ValueError(f"anchor 'source' needs the source matrix in the target's shape, got target "
                             f"{tuple(target_shape)} and source {tuple(source_shape)}")
        if output_scale not in ("none", "rms", "learned"):
            raise ValueError(f"output_scale must be none, rms or learned, got '{output_scale}'")
        if layers < 1 or heads < 1:
            raise ValueError(f"layers and heads must be >= 1, got {layers}, {heads}")
        self.target_shape = tuple(int(v) for v in target_shape)
        self.source_shape = tuple(int(v) for v in source_shape)
        self.output_scale = output_scale
        self.layers = nn.ModuleList(
            KnowledgeTransferLayer(self.target_shape, self.source_shape, heads, attn_dropout, ffn_dropout,
                                   combine, gelu, ln_eps, width)
            for _ in range(layers))
        if output_scale == "learned":
            self.scale = nn.Parameter(torch.ones(()))
            self.register_buffer("scale_initialised", torch.zeros((), dtype=torch.bool))
        self.gated = gate
        if gate:  # residual gate (from 0: an untrained adapter writes back its input)
            self.gate = nn.Parameter(torch.full((), float(gate_init)))
        self.anchor = anchor
        if anchor == "source":  # departure from the source's matrix, from 0
            self.depart = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, y: Tensor, reference: Tensor | None = None,
                metric: Tensor | None = None, feeds: Mapping[str, Tensor] | None = None) -> Tensor:
        """``feeds`` (an ablation, ``benchmarks/transfer_probe.py``): the source matrix seen in
        one place instead of ``y``: a KTL block (``rr`` / ``rc`` / ``cr`` / ``cc``, every layer)
        or ``anchor``."""
        feeds = feeds or {}
        if tuple(x.shape) != self.target_shape or tuple(y.shape) != self.source_shape:
            raise ValueError(f"adapter expects target {self.target_shape} and source "
                             f"{self.source_shape}, got {tuple(x.shape)} and {tuple(y.shape)}")
        out = x
        for layer in self.layers:
            out = layer(out, y, feeds)
        if self.anchor == "source":
            y_anchor = feeds.get("anchor", y)
            out = y_anchor + self.depart * (out - y_anchor)
        if self.output_scale == "rms":
            ref = (x if reference is None else reference).detach()
            if metric is None:
                out = out * (rms(ref) / (rms(out) + 1e-12))
            else:  # ||B out|| = ||B ref||
                g = metric.detach()
                size = ((g @ ref) * ref).sum().clamp_min(0)
                out = out * torch.sqrt(size / (((g @ out) * out).sum().clamp_min(0) + 1e-24))
        elif self.output_scale == "learned":
            if reference is not None and not bool(self.scale_initialised):
                with torch.no_grad():
                    self.scale.copy_(rms(reference) / (rms(out) + 1e-12))
                    self.scale_initialised.fill_(True)
            out = out * self.scale
        if self.gated:
            out = x + self.gate * (out - x)
        return out


def adapter_param_count(adapter: nn.Module) -> int:
    """Number of trainable scalars (spectral-norm ``u``/``v`` are buffers, not counted)."""
    return sum(p.numel() for p in adapter.parameters() if p.requires_grad)
