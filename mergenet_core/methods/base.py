"""The one contract every method implements (mdistiller's ``Distiller`` idea).

A method is constructed from its validated options and the experiment config, may rewrite
the models in :meth:`setup` (before optimisers exist), and advances training by one
lockstep step in :meth:`pair_step`. Methods whose two roles only talk through an
:class:`Exchange` (MergeNet) also implement :meth:`role_step`, which lets the Ray topology
run each role in its own worker with exactly the same code.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel

from ..config import ExperimentConfig
from ..errors import ConfigError
from ..registry import NoOptions, Registry

METHODS = Registry("method")


class Method:
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: build and train a source model
    uses_source: ClassVar[bool] = True
    #: roles can run in separate processes through ``role_step`` + an exchange
    splittable: ClassVar[bool] = False

    def __init__(self, options: BaseModel, cfg: ExperimentConfig):
        self.options = options
        self.cfg = cfg

    # ---------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: ExperimentConfig, options: BaseModel) -> None:
        """Raise :class:`ConfigError` for combinations the method cannot run."""
        if cls.uses_source and cfg.source is None:
            raise ConfigError("source", f"method '{cfg.method.name}' needs a source model")

    @classmethod
    def check_shapes(cls, cfg: ExperimentConfig, options: BaseModel, models: dict[str, torch.nn.Module]) -> list[str]:
        """Fast validation (``mergenet validate`` without ``--deep``): ``field: problem`` lines
        for what :meth:`setup` and :meth:`ready` would refuse, decided from ``models`` alone --
        the models of :meth:`roles_needed`, built without weights (meta device, not yet changed
        by :meth:`setup`: names, shapes and module types only). The first line must be the
        error the full build raises first. Default: nothing to check."""
        return []

    @staticmethod
    def require_same_labels(cfg: ExperimentConfig, method: str) -> None:
        s, t = cfg.source.task, cfg.target.task
        if s.name != t.name or s.options != t.options:
            what = f"source: {s.name}, target: {t.name}" if s.name != t.name else "the task options differ"
            raise ConfigError("method.name", f"'{method}' feeds the target's batches to the source, so both need "
                                             f"the same task and task options ({what})")

    # ---------------------------------------------------------------- lifecycle
    def roles_needed(self) -> tuple[str, ...]:
        return ("source", "target") if self.uses_source else ("target",)

    def trained_roles(self) -> tuple[str, ...]:
        return self.roles_needed()

    def untrained_roles(self) -> tuple[str, ...]:
        """Roles kept at their seed's initialisation: their ``init_from`` is not loaded
        (a control arm, e.g. MergeNet's ``untrained_source``)."""
        return ()

    def setup(self, roles: dict) -> None:
        """Change the models before optimisers are built (e.g. factorise layers)."""

    def config_warnings(self, roles: dict) -> list[str]:
        """``field: problem`` lines for settings that run but are risky (``mergenet validate``
        prints them as warnings; exit 0)."""
        return []

    def ready(self, roles: dict, steps_per_epoch: int) -> None:
        """Called once optimisers exist (build method-owned modules/optimisers here)."""

    def pair_step(self, step: int, roles: dict) -> None:
        """Advance both roles by one optimisation step."""
        for name in self.roles_needed():
            role = roles[name]
            with role.rng_scope():
                role.train_step()

    def role_step(self, step: int, role) -> None:  # pragma: no cover - splittable methods only
        raise NotImplementedError

    def role_metrics(self) -> dict[str, float]:
        """Per-role numbers measured by this process for the roles it hosts since the last
        call (``<role>/...`` keys); a Ray worker's role leader reports its own."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Method metrics accumulated since the last call (e.g. adapter stats)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def role_state_dict(self, role: str) -> dict:
        """Method state kept by the process hosting ``role`` (saved with that role)."""
        return {}

    def load_role_state_dict(self, role: str, state: dict) -> None:
        pass


def softened_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher || student) at temperature T, scaled by T^2."""
    t = temperature
    log_p = torch.log_softmax(student_logits / t, dim=1)
    q = torch.softmax(teacher_logits.detach() / t, dim=1)
    return torch.nn.functional.kl_div(log_p, q, reduction="batchmean") * t * t
