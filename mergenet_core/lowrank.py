"""Low-rank re-encoding of weights (spec section 3).

Layout: a conv kernel ``[out, in/groups, kh, kw]`` is viewed as the matrix
``[out, (in/groups)*kh*kw]`` (plain row-major ``reshape(out, -1)``); a linear weight is
already ``[out, in]``. Factors: ``W_mat ~ B @ A`` with ``B [out, r]`` and ``A [r, cols]``;
only ``A`` travels through the adapter.

Modes (one :class:`Encoding` per model, weight and mode):

* ``learned``: the layer is swapped for a factorised layer (:class:`LowRankLinear` /
  :class:`LowRankConv2d`) whose weight is ``(B @ A) * alpha / r``; ``A`` travels.
* ``svd``: the layer stays dense; each transfer takes the rank-r truncated SVD and writes
  ``W + B (A' - A)``, so the part of ``W`` outside the top-r subspace survives.
* ``full``: the whole matrix travels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

MODES: tuple[str, ...] = ("learned", "svd", "full")

__all__ = [
    "MODES", "conv_to_matrix", "matrix_to_weight", "truncated_svd_factors", "canonical_signs",
    "procrustes_align", "row_cosine", "rms", "rms_rescale", "LowRankLinear", "LowRankConv2d", "Encoding",
    "check_encoding", "make_encoding",
]


# --------------------------------------------------------------------------- layout
def conv_to_matrix(w: Tensor) -> Tensor:
    """``[out, in, kh, kw]`` (or any ``[out, ...]``) -> ``[out, in*kh*kw]``; 2-D is unchanged."""
    if w.dim() < 2:
        raise ValueError(f"expected a weight with >= 2 dims, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


def matrix_to_weight(m: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`conv_to_matrix`: ``[out, cols]`` -> ``shape``."""
    shape = tuple(shape)
    if m.dim() != 2 or m.shape[0] != shape[0] or m.numel() != math.prod(shape):
        raise ValueError(f"matrix {tuple(m.shape)} does not match weight shape {shape}")
    return m.reshape(shape)


def truncated_svd_factors(m: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Balanced rank-r factors of ``m``: ``B = U_r (S_r/scale)^1/2``, ``A = (S_r/scale)^1/2 V_r^T``.

    ``(B @ A) * scale`` is the best rank-r approximation of ``m`` (Eckart-Young).
    Computed in float32 at least; returned in ``m``'s dtype.
    """
    work = m.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = (s[:rank] / scale).sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    return b.to(m.dtype), a.to(m.dtype)


def canonical_signs(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each rank-1 component ``b[:, i] a[i]`` so that the largest-magnitude entry of
    ``a[i]`` is positive (SVD signs are arbitrary; ``B @ A`` is unchanged)."""
    idx = a.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(a.gather(1, idx)).squeeze(1)
    sign[sign == 0] = 1
    return b * sign, a * sign[:, None]


def procrustes_align(b: Tensor, a: Tensor, b_ref: Tensor, a_ref: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate the rank-r basis of ``(b, a)`` towards ``(b_ref, a_ref)`` without changing ``b @ a``.

    Orthogonal Procrustes on the stacked factors ``F = [b; a^T]`` (``[out + cols, r]``):
    ``R = argmin_{R^T R = I} ||F R - F_ref||_F = U V^T`` with ``F^T F_ref = U S V^T``; returns
    ``(b R, R^T a)``. This removes the sign flips and the rotation inside the top-r subspace
    that a fresh SVD introduces from one transfer to the next (and, for repeated singular
    values, the arbitrary basis), so that the rows of ``A`` keep their meaning.
    """
    f = torch.cat([b, a.t()], dim=0).double()
    f_ref = torch.cat([b_ref, a_ref.t()], dim=0).double()
    u, _, vh = torch.linalg.svd(f.t() @ f_ref)
    r = (u @ vh).to(b.dtype)
    return b @ r, r.t() @ a


def row_cosine(new: Tensor, old: Tensor, eps: float = 1e-12) -> float:
    """Mean cosine similarity between corresponding rows of two equally shaped matrices."""
    new, old = new.detach().float().flatten(1), old.detach().float().flatten(1)
    cos = (new * old).sum(1) / (new.norm(dim=1) * old.norm(dim=1)).clamp_min(eps)
    return float(cos.mean())


def rms(t: Tensor) -> Tensor:
    """Root mean square of all entries."""
    return t.pow(2).mean().sqrt()


def rms_rescale(generated: Tensor, reference: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale ``generated`` so its RMS equals that of ``reference`` (differentiable in
    ``generated``; ``reference`` is treated as a constant)."""
    return generated * (rms(reference.detach()) / (rms(generated) + eps))


# ----------------------------------------------------------------- factorised layers
class _LowRank(nn.Module):
    """Shared part: trainable ``A [r, cols]``, ``B [out, r]``; weight ``(B@A)*alpha/r``."""

    A: nn.Parameter
    B: nn.Parameter

    def _init_factors(self, out: int, cols: int, rank: int, alpha: float | None,
                      bias: bool | nn.Parameter | None, ref: Tensor) -> None:
        if not 1 <= rank <= min(out, cols):
            raise ValueError(f"rank {rank} must be in [1, {min(out, cols)}] for a {out}x{cols} matrix")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.A = nn.Parameter(torch.empty(rank, cols, device=ref.device, dtype=ref.dtype))
        self.B = nn.Parameter(torch.empty(out, rank, device=ref.device, dtype=ref.dtype))
        if isinstance(bias, nn.Parameter):
            self.bias = bias  # keep the dense layer's bias object
        elif bias:
            self.bias = nn.Parameter(torch.zeros(out, device=ref.device, dtype=ref.dtype))
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def init_from_dense(self, weight: Tensor) -> None:
        """Set ``A``, ``B`` so that the layer's weight is the best rank-r approximation of
        ``weight`` (truncated SVD, split evenly and divided by ``alpha/r``). A ``meta`` weight
        (fast validation: only shapes exist) leaves the factors as they are."""
        if weight.is_meta:  # an SVD on meta would only load torch's Python meta kernels (~1 s)
            return
        b, a = truncated_svd_factors(conv_to_matrix(weight), self.rank, self.scaling)
        self.A.copy_(a)
        self.B.copy_(b)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def weight(self) -> Tensor:
        """The dense weight ``(B @ A) * alpha / r`` in the dense layer's shape (differentiable)."""
        return ((self.B @ self.A) * self.scaling).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("stride", "padding", "groups")
                        if hasattr(self, k))
        return (f"weight_shape={self.weight_shape}, rank={self.rank}, alpha={self.alpha:g}"
                f"{extra}, bias={self.bias is not None}")


class LowRankLinear(_LowRank):
    """``nn.Linear`` with a factorised weight ``(B @ A) * alpha / r``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 bias: bool | nn.Parameter = True, device=None, dtype=None,
                 init_weight: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if init_weight is None:  # default: best rank-r of a default-initialised nn.Linear
            init_weight = nn.Linear(in_features, out_features, bias=False, device=device,
                                    dtype=dtype).weight
        self._init_factors(out_features, in_features, rank, alpha, bias, init_weight)
        self.init_from_dense(init_weight)

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int, alpha: float | None = None) -> "LowRankLinear":
        """Factorise ``layer`` (SVD init from its weight; the bias Parameter is reused)."""
        w = layer.weight
        return cls(layer.in_features, layer.out_features, rank, alpha,
                   bias=layer.bias if layer.bias is not None else False,
                   device=w.device, dtype=w.dtype, init_weight=w)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class LowRankConv2d(_LowRank):
    """``nn.Conv2d`` (zeros padding; any stride/padding/dilation/groups) with a factorised
    kernel: ``B [out, r] @ A [r, (in/groups)*kh*kw]`` reshaped to ``[out, in/groups, kh, kw]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 rank: int, alpha: float | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool | nn.Parameter = True, device=None, dtype=None,
                 init_weight: Tensor | None = None):
        super().__init__()
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                          groups, bias=False, device="meta", dtype=dtype)  # arg checks + shape
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = dense.kernel_size, dense.stride
        self.padding, self.dilation, self.groups = dense.padding, dense.dilation, groups
        self._shape = tuple(dense.weight.shape)
        if init_weight is None:  # default: best rank-r of a default-initialised nn.Conv2d
            init_weight = nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups,
                                    bias=False, device=device, dtype=dtype).weight
        if tuple(init_weight.shape) != self._shape:
            raise ValueError(f"init_weight shape {tuple(init_weight.shape)} != {self._shape}")
        self._init_factors(out_channels, math.prod(self._shape[1:]), rank, alpha, bias, init_weight)
        self.init_from_dense(init_weight)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, rank: int, alpha: float | None = None) -> "LowRankConv2d":
        """Factorise ``layer`` (SVD init from its kernel; the bias Parameter is reused)."""
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode '{layer.padding_mode}' is not supported (only 'zeros')")
        w = layer.weight
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, rank, alpha,
                   layer.stride, layer.padding, layer.dilation, layer.groups,
                   bias=layer.bias if layer.bias is not None else False,
                   device=w.device, dtype=w.dtype, init_weight=w)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self._shape

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


# ------------------------------------------------------------------------ encodings
class Encoding:
    """How one weight of one model is read into / written from the adapter.

    ``read`` returns the travelling matrix, ``write`` puts a new one in place (keeping the
    Parameter objects, so optimiser state survives), ``override`` gives the differentiable
    parameter mapping for ``torch.func.functional_call`` (``exact`` rule) and ``delta``
    gives the ``delta`` rule's ``Delta`` after the target's optimiser step. Under plain SGD
    with learning rate ``lr``, ``delta(new) == lr * dL/dnew`` in every mode.
    """

    mode: str

    def __init__(self, model: nn.Module, weight_name: str, param_path: str, rank: int | None,
                 alpha: float | None):
        self.model = model
        self.weight_name = weight_name
        self.param_path = param_path
        self.rank = rank
        self.alpha = alpha
        self._last_read: Tensor | None = None
        #: diagnostics of the last read / write (``None`` before the first one)
        self.last_row_cos: float | None = None
        self.last_write_change: float | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the travelling matrix."""
        raise NotImplementedError

    def read(self) -> Tensor:
        """Detached clone of the travelling matrix. Records :attr:`last_row_cos`, the mean row
        cosine between this read and the previous one (how continuous the tokens are)."""
        out = self._read()
        self.last_row_cos = None if self._last_read is None else row_cosine(out, self._last_read.to(out.device))
        self._last_read = out.clone()
        return out

    def write(self, new: Tensor) -> None:
        """Write ``new`` (shape :attr:`shape`) into the model in place, under no_grad. Records
        :attr:`last_write_change` = ``||W_after - W_before|| / ||W_before||`` of the dense layer."""
        self._check(new)
        with torch.no_grad():
            before = self.dense_matrix().clone()
            self._write(new.detach())
            after = self.dense_matrix()
            self.last_write_change = float((after - before).norm() / before.norm().clamp_min(1e-12))

    def dense_matrix(self) -> Tensor:
        """The layer's current dense weight as a matrix (detached)."""
        raise NotImplementedError

    def _read(self) -> Tensor:
        raise NotImplementedError

    def _write(self, new: Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a resumed run needs to read the same factors (and diagnostics) again."""
        return {"last_read": self._last_read}

    def load_state_dict(self, state: dict) -> None:
        self._last_read = state.get("last_read")

    def override(self, new: Tensor) -> dict[str, Tensor]:
        """``{param path: tensor}`` for ``functional_call``; differentiable in ``new``."""
        raise NotImplementedError

    def delta(self, new: Tensor) -> Tensor:
        """``Delta`` for the ``delta`` rule, shaped like ``new``; call after the target step."""
        raise NotImplementedError

    def scale_metric(self) -> Tensor | None:
        """``G = B^T B`` (r x r) of the factor that multiplies the travelling matrix in the layer,
        so that ``||B X||_F^2 = sum((G X) * X)``: what the adapter's ``output_scale: rms`` needs to
        give a write the norm of the part it replaces. ``None``: the matrix is the layer (full)."""
        return None

    def parameters_touched(self) -> list[nn.Parameter]:
        """Parameter objects that :meth:`write` modifies."""
        raise NotImplementedError

    def _check(self, new: Tensor) -> None:
        if tuple(new.shape) != tuple(self.shape):
            raise ValueError(f"{self.weight_name} ({self.mode}): expected a matrix of shape "
                             f"{tuple(self.shape)}, got {tuple(new.shape)}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.weight_name!r} -> {self.param_path!r}, "
                f"mode={self.mode}, rank={self.rank}, shape={tuple(self.shape)})")


class LearnedEncoding(Encoding):
    """Mode ``learned``: the factor ``A`` of a :class:`LowRankLinear`/:class:`LowRankConv2d`."""

    mode = "learned"

    def __init__(self, model: nn.Module, weight_name: str, param_path: str, layer: _LowRank):
        super().__init__(model, weight_name, param_path, layer.rank, layer.alpha)
        self.layer = layer

    @property
    def shape(self) -> torch.Size:
        return self.layer.A.shape

    def _read(self) -> Tensor:
        return self.layer.A.detach().clone()

    def _write(self, new: Tensor) -> None:
        self.layer.A.copy_(new)

    def dense_matrix(self) -> Tensor:
        return conv_to_matrix(self.layer.weight.detach())

    def override(self, new: Tensor) -> dict[str, Tensor]:
        self._check(new)
        return {self.param_path: new.to(self.layer.A.dtype)}

    def delta(self, new: Tensor) -> Tensor:
        # A was set to new, then A_now = new - lr * dL/dA  =>  new - A_now = lr * dL/dnew
        return new.detach() - self.layer.A.detach()

    def scale_metric(self) -> Tensor:
        b = conv_to_matrix(self.layer.B.detach())  # the layer's weight is (B A) alpha / r
        return b.t() @ b

    def parameters_touched(self) -> list[nn.Parameter]:
        return [self.layer.A]


class FullEncoding(Encoding):
    """Mode ``full``: the whole (matrix-viewed) weight travels."""

    mode = "full"

    def __init__(self, model: nn.Module, weight_name: str, param: nn.Parameter):
        super().__init__(model, weight_name, weight_name, None, None)
        self.param = param

    @property
    def shape(self) -> torch.Size:
        return conv_to_matrix(self.param).shape

    def _read(self) -> Tensor:
        return conv_to_matrix(self.param.detach()).clone()

    def _write(self, new: Tensor) -> None:
        self.param.copy_(matrix_to_weight(new, self.param.shape))

    def dense_matrix(self) -> Tensor:
        return conv_to_matrix(self.param.detach())

    def override(self, new: Tensor) -> dict[str, Tensor]:
        self._check(new)
        return {self.param_path: matrix_to_weight(new, self.param.shape).to(self.param.dtype)}

    def delta(self, new: Tensor) -> Tensor:
        return new.detach() - conv_to_matrix(self.param.detach())

    def parameters_touched(self) -> list[nn.Parameter]:
        return [self.param]


class SVDEncoding(Encoding):
    """Mode ``svd``: dense weight; ``A``/``B`` from the truncated SVD taken at :meth:`read`.

    ``read`` stores ``W0`` (the matrix at read time), ``B`` and ``A``; the written weight is
    ``W0 + B (new - A)`` (idempotent; equals ``W += B (new - A)`` at transfer time).

    ``align`` (default): the factors are made continuous across reads -- canonical signs
    (:func:`canonical_signs`), then the rank-r basis rotated onto the previous read's
    (:func:`procrustes_align`); a read of an unchanged weight returns the previous factors
    exactly. ``B @ A`` is the truncated SVD either way, so the write-back stays exact.
    """

    mode = "svd"

    def __init__(self, model: nn.Module, weight_name: str, param: nn.Parameter, rank: int,
                 align: bool = True):
        super().__init__(model, weight_name, weight_name, rank, None)
        self.param = param
        self.align = align
        self._w0: Tensor | None = None
        self._b: Tensor | None = None
        self._a: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rank, conv_to_matrix(self.param).shape[1]))

    @property
    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)`` of the last :meth:`read`."""
        if self._b is None or self._a is None:
            raise RuntimeError(f"{self.weight_name} (svd): call read() before write/override/delta")
        return self._b, self._a

    def _read(self) -> Tensor:
        w = conv_to_matrix(self.param.detach()).clone()
        if self._w0 is not None and self._w0.device != w.device:  # restored from a CPU checkpoint
            self._w0, self._b, self._a = (t.to(w.device) for t in (self._w0, self._b, self._a))
        if self.align and self._a is not None and self._w0 is not None and torch.equal(w, self._w0):
            return self._a.clone()  # unchanged weight: the very same factors
        b, a = truncated_svd_factors(w, self.rank)
        if self.align:
            b, a = canonical_signs(b, a)
            if self._a is not None and self._b is not None and self._b.shape == b.shape:
                b, a = procrustes_align(b, a, self._b.to(b.device), self._a.to(a.device))
        self._w0, self._b, self._a = w, b, a
        return a.clone()

    def dense_matrix(self) -> Tensor:
        return conv_to_matrix(self.param.detach())

    def state_dict(self) -> dict:
        return {**super().state_dict(), "w0": self._w0, "b": self._b, "a": self._a}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._w0, self._b, self._a = state.get("w0"), state.get("b"), state.get("a")

    def _generated(self, new: Tensor) -> Tensor:
        b, a = self.factors
        assert self._w0 is not None
        return self._w0 + b @ (new.to(a.dtype) - a)

    def _write(self, new: Tensor) -> None:
        self.param.copy_(matrix_to_weight(self._generated(new), self.param.shape))

    def override(self, new: Tensor) -> dict[str, Tensor]:
        self._check(new)
        return {self.param_path: matrix_to_weight(self._generated(new), self.param.shape)}

    def delta(self, new: Tensor) -> Tensor:
        # W' = W0 + B(new - A); dL/dnew = B^T dL/dW'; SGD: W_now = W' - lr dL/dW'
        b, _ = self.factors
        written = self._generated(new.detach())
        return b.t() @ (written - conv_to_matrix(self.param.detach()))

    def scale_metric(self) -> Tensor:
        b, _ = self.factors
        return b.t() @ b

    def parameters_touched(self) -> list[nn.Parameter]:
        return [self.param]


def _swap_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def check_encoding(model: nn.Module, weight_name: str, mode: str, rank: int = 4,
                   alpha: float | None = None, field: str = "layer_pairs") -> tuple[int, int]:
    """The checks :func:`make_encoding` makes on a dense (not yet factorised) ``model``, without
    touching any weight: the model may live on the ``meta`` device (fast validation). Returns
    the shape of the travelling matrix; invalid input raises ``ConfigError(field, ...)``."""
    if mode not in MODES:
        raise ConfigError(field, f"unknown low-rank mode '{mode}' (expected one of {', '.join(MODES)})")
    mod_path, _, leaf = weight_name.rpartition(".")
    try:
        param = model.get_parameter(weight_name)
    except AttributeError:
        raise ConfigError(field, f"model has no parameter '{weight_name}'") from None
    if param.dim() < 2:
        raise ConfigError(field, f"parameter '{weight_name}' has shape {tuple(param.shape)}; "
                                 "only matrices and conv kernels can be transferred")
    out, cols = int(param.shape[0]), math.prod(int(d) for d in param.shape[1:])
    if mode == "full":
        return out, cols
    if not isinstance(rank, int) or not 1 <= rank <= min(out, cols):
        raise ConfigError(field, f"rank {rank} is invalid for '{weight_name}' viewed as a "
                                 f"{out}x{cols} matrix (must be 1..{min(out, cols)})")
    if alpha is not None and not alpha > 0:
        raise ConfigError(field, f"alpha must be > 0, got {alpha}")
    if mode == "svd":
        return rank, cols
    owner = model.get_submodule(mod_path) if mod_path else model
    if leaf != "weight" or not mod_path or type(owner) not in (nn.Linear, nn.Conv2d):
        raise ConfigError(field, f"mode 'learned' needs the weight of an nn.Linear or nn.Conv2d "
                                 f"submodule; '{weight_name}' is not (use 'svd' or 'full')")
    if isinstance(owner, nn.Conv2d) and owner.padding_mode != "zeros":
        raise ConfigError(field, f"'{weight_name}': padding_mode '{owner.padding_mode}' is not "
                                 "supported by mode 'learned' (use 'svd' or 'full')")
    return rank, cols


def make_encoding(model: nn.Module, weight_name: str, mode: str, rank: int = 4,
                  alpha: float | None = None, field: str = "layer_pairs", align: bool = True) -> Encoding:
    """Create the :class:`Encoding` of ``model``'s dense parameter ``weight_name``.

    ``learned`` replaces the owning ``nn.Linear``/``nn.Conv2d`` in place by a factorised
    layer (SVD-initialised; create optimisers afterwards) and travels ``<module>.A``;
    calling it again for an already factorised layer with the same rank/alpha reuses it.
    ``alpha`` defaults to ``rank`` (scaling 1); ``align`` (svd) keeps the factors continuous
    across reads (:class:`SVDEncoding`). Invalid input raises ``ConfigError(field, ...)``
    (the checks of :func:`check_encoding`).
    """
    if mode not in MODES:
        raise ConfigError(field, f"unknown low-rank mode '{mode}' (expected one of {', '.join(MODES)})")
    mod_path, _, leaf = weight_name.rpartition(".")
    try:
        owner = model.get_submodule(mod_path) if mod_path else model
    except AttributeError:
        owner = None
    if isinstance(owner, _LowRank) and leaf == "weight":  # factorised earlier (shared layer)
        if mode != "learned":
            raise ConfigError(field, f"'{weight_name}' is already factorised; only mode 'learned' can use it")
        a = float(rank if alpha is None else alpha)
        if owner.rank != rank or owner.alpha != a:
            raise ConfigError(field, f"'{weight_name}' is already factorised with rank {owner.rank}, "
                                     f"alpha {owner.alpha:g}; got rank {rank}, alpha {a:g}")
        return LearnedEncoding(model, weight_name, f"{mod_path}.A", owner)
    check_encoding(model, weight_name, mode, rank, alpha, field)
    param = model.get_parameter(weight_name)
    if mode == "full":
        return FullEncoding(model, weight_name, param)
    if mode == "svd":
        return SVDEncoding(model, weight_name, param, rank, align)
    layer = (LowRankLinear if isinstance(owner, nn.Linear) else LowRankConv2d).from_dense(owner, rank, alpha)
    layer.train(owner.training)
    _swap_module(model, mod_path, layer)
    return LearnedEncoding(model, weight_name, f"{mod_path}.A", layer)
