"""The orchestrator's pair config: the core :class:`ExperimentConfig` plus a ``ray`` section
(how a pair runs on Ray). The core config knows nothing of Ray; the single-process engine
ignores this section. Importing this module imports no Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from mergenet_core import checks
from mergenet_core.config import ExperimentConfig, Strict
from mergenet_core.errors import ConfigError, short


class AdapterPlacement(Strict):
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="fractional GPUs for the adapter actor")


class RayPairSpec(Strict):
    """How a pair runs on Ray (``mergenet train --ray`` and grids); ignored by the engine."""

    source_workers: PositiveInt = 1
    target_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    worker_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="extra (custom) Ray resources per worker, e.g. {accel_slot: 1}")
    adapter: AdapterPlacement = Field(default_factory=AdapterPlacement)
    mode: Literal["sync", "async"] = "sync"
    staleness: PositiveInt = Field(1, description="async: adapter output at most this many transfers old")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    topology: str = Field(
        "auto", description="grids: a registered topology (orchestrator/topology/): split = Ray Train role "
                            "workers + adapter actor; inline = the whole pair in the Tune trial process; auto = "
                            "split when the pair asks for GPUs, several workers per role, spread placement or "
                            "custom worker resources, else inline")

    @field_validator("topology")
    @classmethod
    def _known_topology(cls, v: str) -> str:
        from orchestrator import topology  # its modules import no Ray

        known = ["auto", *topology.names()]
        if v not in known:
            raise ValueError(f"unknown topology '{short(v)}' (known: {', '.join(known)})")
        return v


class PairConfig(ExperimentConfig):
    """A pair experiment as the orchestrator runs it (``mergenet train``, ``--ray``, grids)."""

    ray: RayPairSpec = Field(default_factory=RayPairSpec)


def worker_layout(cfg: PairConfig, roles) -> list[str]:
    """The role of each Ray Train worker (world rank order) for a method's
    :class:`~mergenet_core.methods.base.Roles`: roles that may run apart get their own
    workers (the target's first, so world rank 0 is the target's leader); otherwise one worker
    hosts the whole pair."""
    rs = cfg.ray
    workers = {"target": rs.target_workers, "source": rs.source_workers}
    if roles.apart:
        for role, n in workers.items():
            if n > 1 and role not in roles.needed:
                raise ConfigError(f"ray.{role}_workers", f"method '{cfg.method.name}' has no {role} role here; "
                                                         f"set {role}_workers to 1")
        return [r for r in ("target", "source") if r in roles.needed for _ in range(workers[r])]
    if rs.source_workers > 1 or rs.target_workers > 1:
        raise ConfigError("ray.target_workers", f"method '{cfg.method.name}' runs both models in one "
                                                "worker; set source_workers and target_workers to 1")
    return ["target"]


def parse_config(data: dict) -> PairConfig:
    """Validate a pair config mapping fully (schema, registries, method checks)."""
    return checks.parse_config(data, PairConfig)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PairConfig:
    """Read (``extends:``), override (``--set``) and fully validate a pair config file."""
    return checks.load_config(path, overrides, PairConfig)
