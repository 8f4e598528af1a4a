"""The one contract every method implements (mdistiller's ``Distiller`` idea).

A method is a class registered under a name (``METHODS.register("name")(cls)``); the registry
reads its options model from ``cls.Options``. It is constructed from its validated options and
the experiment config, may rewrite the models in :meth:`setup` (before optimisers exist), and
computes each role's loss in a step (:meth:`loss`), acting at the step's named hooks
(:meth:`before_step`, :meth:`after_backward`, :meth:`after_step`). The step itself -- batches,
forward and backward passes, clipping, optimiser steps -- is :func:`mergenet_core.training.step.take_step`;
the training loop (:class:`~mergenet_core.training.loop.PairLoop`) owns epochs, evaluation, metrics and
checkpoints; the method owns only its losses, hooks and its own state.

Roles: :meth:`roles` is the one declaration of which roles the method needs, trains and keeps
untrained, whether they may run in separate processes, and whether they share one batch. If
roles that run apart talk to each other, they do it through an *exchange* (an object with the
:class:`ExchangeAPI` methods): :meth:`exchange_spec` describes it with plain data,
:meth:`build_exchange` builds it from that description in any process (a host puts it behind a
Ray actor), and :meth:`attach` hands a role-hosting process the exchange (or a proxy) to use.
Hosts call only these methods, so no host names a method.

Validation: :meth:`check_config` sees the config alone; everything the models decide comes from
:meth:`setup` and :meth:`ready` themselves. Fast validation (``mergenet validate``,
``mergenet_core.config.weightless``) runs them on weightless roles (``PairState.build(weightless=True)``:
models on the ``meta`` device, no data, no optimisers), so it raises the full build's errors by
construction; there is no second copy of the checks to keep in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from pydantic import BaseModel

from ..errors import ConfigError
from ..registry import NoOptions, Registry

if TYPE_CHECKING:  # the config module never imports methods; no cycle at run time either
    from ..config import ExperimentConfig



def _check_entry(entry) -> None:
    """A method is a :class:`Method` subclass (the one contract hosts call)."""
    if not (isinstance(entry.fn, type) and issubclass(entry.fn, Method)):
        raise ValueError(f"method '{entry.name}': {entry.fn!r} is not a subclass of mergenet_core.methods.Method")


METHODS = Registry("method", check=_check_entry)


@dataclass(frozen=True)
class Roles:
    """A method's roles (:meth:`Method.roles`): the one declaration hosts, validation and grids read."""

    #: the roles the pair builds, in the order a step takes them
    needed: tuple[str, ...] = ("source", "target")
    #: the roles that train (their optimisers step; evaluated and reported)
    trained: tuple[str, ...] = ("source", "target")
    #: roles kept at their seed's initialisation: ``init_from`` not loaded (a control arm)
    untrained: tuple[str, ...] = ()
    #: the roles may run in separate processes (each its own process group; an exchange if they
    #: talk); else one process hosts them all
    apart: bool = False
    #: the role whose batch every role's forward takes (both models on one batch; not ``apart``)
    shared_batch: str | None = None


class Note(str):
    """A line of :meth:`Method.config_warnings` that states a fact about the config (e.g. the
    adapters' size) rather than a risk; it stays a ``Note`` where a caller prefixes it
    (``Note(f"{where}: {note}")``)."""

class ExchangeAPI(Protocol):
    """What role processes call on a method's exchange (in-process object or a Ray proxy)."""

    def put(self, step: int, mats: dict) -> None: ...
    def get(self, step: int, role: str) -> tuple[int, dict]: ...
    def feedback(self, gen_step: int, grads: dict, epoch: int) -> None: ...
    def take_epoch_metrics(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def abandon(self, error: BaseException) -> None:
        """Superseded (a host restarted the roles): fail every waiting and later call with ``error``."""


class Method:
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: metrics (besides the roles' train/val/test numbers) this method reports every epoch
    epoch_metric_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: BaseModel, cfg: "ExperimentConfig"):
        self.options = options
        self.cfg = cfg

    # ---------------------------------------------------------------- roles / config
    @classmethod
    def roles(cls, options: BaseModel | None = None) -> Roles:
        """The roles for ``options``; ``None``: for any options (each tuple the union over all
        options, ``apart`` if some allow it; ``orchestrator.grid.uses_source`` reads ``needed``).
        Default: source and target, both trained, in one process."""
        return Roles()

    @classmethod
    def check_config(cls, cfg: "ExperimentConfig", options: BaseModel) -> list[str]:
        """``field: problem`` lines for combinations the method cannot run (fields across
        blocks; the options model itself is already valid)."""
        if "source" in cls.roles(options).needed and cfg.source is None:
            return [str(ConfigError("source", f"method '{cfg.method.name}' needs a source model"))]
        return []

    # ---------------------------------------------------------------- exchange
    def exchange_spec(self) -> dict | None:
        """Plain (picklable) data from which :meth:`build_exchange` builds this method's exchange
        in a process without the models; ``None``: the roles never talk. Needs :meth:`setup`."""
        return None

    def build_exchange(self, spec: dict, steps_per_epoch: int, device: str = "cpu",
                       staleness: int = 0) -> ExchangeAPI:
        """The exchange for ``spec``; ``staleness``: how many exchanges old an answer may be
        (0: synchronous)."""
        raise NotImplementedError(f"{type(self).__name__} has no exchange")

    def attach(self, exchange: ExchangeAPI) -> None:
        """Use ``exchange`` (e.g. a proxy to a Ray actor holding the real one)."""
        raise NotImplementedError(f"{type(self).__name__} has no exchange")

    def setup(self, roles: dict) -> None:
        """Change the models before optimisers are built (e.g. factorise layers); a
        :class:`~mergenet_core.errors.ConfigError` for what the models cannot do.

        Also runs in fast validation, as does :meth:`ready`, on
        :class:`~mergenet_core.training.roles.WeightlessRole` s (``model`` on the ``meta`` device,
        ``device`` meta): decide errors from names, shapes and module types, and skip computing
        values of meta tensors (``t.is_meta``; factories, views and ``copy_`` cost nothing there,
        arithmetic loads torch's Python meta kernels, seconds)."""

    def config_warnings(self, roles: dict) -> list[str]:
        """``field: problem`` lines for settings that run but are risky (``mergenet validate``
        prints them as warnings; exit 0). A :class:`Note` among them is a statement, not a
        risk (``mergenet validate`` prints it as a note)."""
        return []

    def ready(self, roles: dict, steps_per_epoch: int) -> None:
        """Called once optimisers exist (build method-owned modules/optimisers here); in fast
        validation on the weightless roles, without their optimisers (see :meth:`setup`)."""

    # ---------------------------------------------------------------- the step (mergenet_core/training/step.py)
    def before_step(self, step: int, roles: dict) -> None:
        """Before any forward of step ``step``, with the roles the step takes (``needed`` order)."""

    def loss(self, role: str, outs: dict) -> torch.Tensor:
        """The loss ``role`` backpropagates, from the step's :class:`~mergenet_core.training.step.Forward`
        of each role (its own; every role's with ``Roles.shared_batch``). Default: its cross-entropy."""
        return outs[role].ce

    def after_backward(self, step: int, role) -> None:
        """Between a trained role's backward pass (gradients averaged across its workers) and its
        optimiser step."""

    def after_step(self, step: int, role) -> None:
        """After ``role``'s optimiser step, in its turn in ``needed`` order (also for a role the
        step takes that does not train)."""

    def role_metrics(self) -> dict[str, float]:
        """Per-role numbers measured by this process for the roles it hosts since the last
        call (``<role>/...`` keys); a Ray worker's role leader reports its own."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Method metrics accumulated since the last call (e.g. adapter stats)."""
        return {}

    def state_dict(self, role: str | None = None) -> dict:
        """The method's state shared by the pair (a bundle's ``method``); with ``role``: the state
        kept by the process hosting that role (saved with it, as its ``method_role``)."""
        return {}

    def load_state_dict(self, state: dict, role: str | None = None) -> None:
        """Restore what :meth:`state_dict` (of the same ``role``) returned."""


def require_same_labels(cfg: "ExperimentConfig", method: str) -> list[str]:
    """A ``method.name`` problem when ``method`` feeds the target's batches to the source and the
    two roles' tasks (or task options) differ."""
    s, t = cfg.source.task, cfg.target.task
    if s.name != t.name or s.options != t.options:
        what = f"source: {s.name}, target: {t.name}" if s.name != t.name else "the task options differ"
        return [str(ConfigError("method.name", f"'{method}' feeds the target's batches to the source, so both "
                                               f"need the same task and task options ({what})"))]
    return []


def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher || student) at temperature T, scaled by T^2."""
    t = temperature
    log_p = torch.log_softmax(student_logits / t, dim=1)
    q = torch.softmax(teacher_logits.detach() / t, dim=1)
    return torch.nn.functional.kl_div(log_p, q, reduction="batchmean") * t * t
