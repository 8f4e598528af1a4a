"""One optimisation step of the roles a process hosts: the one place that draws batches, runs
the forward and backward passes and steps the optimisers. Every host calls :func:`take_step`
(the engine with both roles, a Ray Train worker with its own role or the co-located pair).

A method computes each role's loss (:meth:`~mergenet_core.methods.base.Method.loss`) and may
act at named points of the step. Order inside one step:

1. ``method.before_step(step, roles)``, with every role the step takes (``needed`` order);
2. without ``Roles.shared_batch``: each role in ``needed`` order; a trained one, inside its own
   RNG scope, draws its batch, runs its forward, takes its loss, records it, backpropagates
   (gradients averaged across the role's workers), calls ``method.after_backward(step, role)``
   and steps its optimiser; then, trained or not, ``method.after_step(step, role)``;
3. with ``shared_batch`` (both models on one batch, in one process): that role draws the batch
   and runs its forward first, then every other role its forward on the same batch (an
   untrained one in eval mode, without gradients), each in its own RNG scope; then each role
   in ``needed`` order as in 2, from the forwards of all roles.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .loop import PairState
    from ..methods.base import Method
    from .roles import Role


@dataclass
class Forward:
    """One role's forward pass in a step: the batch, the cross-entropy and the logits."""

    x: Any
    y: torch.Tensor
    ce: torch.Tensor
    logits: torch.Tensor


def step_roles(pair: "PairState", hosted: tuple[str, ...] | None = None) -> dict[str, "Role"]:
    """The roles a step takes: those of ``pair`` (or only ``hosted``), in ``needed`` order."""
    m = pair.method
    return {n: pair.roles[n] for n in m.roles(m.options).needed
            if n in pair.roles and (hosted is None or n in hosted)}


def take_step(pair: "PairState", step: int, hosted: tuple[str, ...] | None = None,
              streams: dict[str, "torch.cuda.Stream"] | None = None) -> None:
    """Optimisation step ``step`` of the pair's roles (``hosted``: only these).

    ``streams`` (CUDA, one process hosting several roles; ``Engine(role_streams=True)``): each
    role's part of the step (batch, forward, backward, optimiser step and the method's hooks after
    them) is queued on that role's own CUDA stream, so the device may overlap the roles' kernels.
    Each role stream first waits for the work queued before it (``before_step``: MergeNet's
    write of the generated matrix), and the caller's stream waits for every role stream at the
    end, so what follows the step sees it complete. Without CUDA: no effect."""
    roles = step_roles(pair, hosted)
    pair.method.before_step(step, roles)
    _train(pair.method, step, roles, streams)


def train_roles(pair: "PairState", step: int, hosted: tuple[str, ...] | None = None) -> None:
    """The step without ``before_step``: forwards, losses, backward passes, optimiser steps and
    the hooks after them (tests and benchmarks look between the two)."""
    _train(pair.method, step, step_roles(pair, hosted))


def _forward(role: "Role", x, y) -> Forward:
    ce, logits = role.loss(x, y)
    return Forward(x, y, ce, logits)


def _update(m: "Method", step: int, role: "Role", outs: dict[str, Forward]) -> None:
    out = outs[role.name]
    loss = m.loss(role.name, outs)
    role.record(out.ce, out.logits, out.y)
    role.backward(loss)
    m.after_backward(step, role)
    role.apply_step()


def _on_stream(streams: dict | None, name: str):
    """A context queueing this role's work on its own CUDA stream (after the work queued so far
    on the current stream); a null context without streams."""
    s = (streams or {}).get(name)
    if s is None:
        return contextlib.nullcontext()
    s.wait_stream(torch.cuda.current_stream(s.device))
    return torch.cuda.stream(s)


def _join(streams: dict | None) -> None:
    for s in (streams or {}).values():
        torch.cuda.current_stream(s.device).wait_stream(s)


def _train(m: "Method", step: int, roles: dict[str, "Role"], streams: dict | None = None) -> None:
    decl = m.roles(m.options)
    trained = set(decl.trained)
    if decl.shared_batch is None:
        for name, role in roles.items():
            with _on_stream(streams, name):
                if name in trained:
                    with role.rng_scope():
                        role.model.train()
                        x, y = role.next_batch()
                        _update(m, step, role, {name: _forward(role, x, y)})
                m.after_step(step, role)
        _join(streams)
        return
    owner = roles[decl.shared_batch]
    owner.model.train(owner.name in trained)
    with owner.rng_scope(), torch.set_grad_enabled(owner.name in trained):
        x, y = owner.next_batch()
        outs = {owner.name: _forward(owner, x, y)}
    for name, role in roles.items():
        if name != owner.name:
            role.model.train(name in trained)
            with role.rng_scope(), torch.set_grad_enabled(name in trained):
                outs[name] = _forward(role, x, y)
    for name, role in roles.items():
        if name in trained:
            with role.rng_scope():
                _update(m, step, role, outs)
        m.after_step(step, role)
