"""Links: which role's weight feeds which role's weight (one adapter per link), and the
gradient the ``exact`` update rule sends back."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import LayerPair, MergeNetOptions


@dataclass(frozen=True)
class Link:
    id: str
    index: int          # layer pair index
    provider: str       # role whose weight is the source Y
    provider_param: str
    receiver: str       # role whose weight is rewritten (X)
    receiver_param: str
    pair: LayerPair
    reverse: bool = False  # direction both: target -> source

    def ends(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        """((role, param, config side) of the provider, same of the receiver)."""
        a, b = ("target", "source") if self.reverse else ("source", "target")
        return (self.provider, self.provider_param, a), (self.receiver, self.receiver_param, b)


def make_links(opts: MergeNetOptions) -> list[Link]:
    src_role = "target" if opts.self_transfer else "source"
    links = []
    for i, lp in enumerate(opts.layer_pairs):
        links.append(Link(str(i), i, src_role, lp.source, "target", lp.target, lp))
        if opts.direction == "both":
            links.append(Link(f"{i}r", i, "target", lp.target, src_role, lp.source, lp, reverse=True))
    return links


def exact_grad(enc, weight_grad: Tensor | None = None) -> Tensor:
    """``dL/dA'`` for the ``exact`` rule from the gradient already on the written parameter.

    After ``write(A')`` the receiver's parameter equals ``A'`` (learned, full) or
    ``W + B(A' - A)`` (svd), so the chain rule gives ``dL/dA'`` from ``param.grad`` —
    the same number ``functional_call`` through the generated weight gives (tested).
    """
    from ...lowrank import conv_to_matrix

    param = enc.parameters_touched()[0]
    g = param.grad if weight_grad is None else weight_grad
    if g is None:
        return torch.zeros(tuple(enc.shape), device=param.device)
    if enc.mode == "learned":
        return g.detach().clone()
    gm = conv_to_matrix(g.detach())
    if enc.mode == "full":
        return gm.clone()
    b, _ = enc.factors
    return b.t() @ gm
