"""The orchestrator's pair config: the core :class:`ExperimentConfig` plus a ``ray`` section
(how a pair runs on Ray). The core config knows nothing of Ray; the single-process engine
ignores this section. Importing this module imports no Ray.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, ValidationInfo, field_validator

from mergenet_core.config import checks
from mergenet_core.config import ExperimentConfig, Strict
from mergenet_core.errors import short


class AdapterPlacement(Strict):
    num_cpus: float = Field(0.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="fractional GPUs for the adapter actor")


class HangSpec(Strict):
    """Hang detection in the split topology (docs/RELIABILITY.md, "Hung peers"): every worker
    beats every ``interval_s``; a worker whose peer stopped beating, whose adapter actor stopped
    answering, or whose own adapter call has waited longer than the deadline
    ``max(floor_s, step_multiple x the slowest measured step time)`` exits, and Ray Train restarts
    the pair from its last checkpoint as after a killed worker."""

    enabled: bool = True
    floor_s: PositiveFloat = Field(
        20.0, description="never declare a hang sooner (a loaded machine may stall a process this long)")
    step_multiple: PositiveFloat = Field(
        10.0, description="deadline in measured step times (the slowest worker's mean step) when above the floor")
    interval_s: PositiveFloat = Field(1.0, validate_default=True, description="heartbeat and check period")

    @field_validator("interval_s")
    @classmethod
    def _interval_below_floor(cls, v: float, info) -> float:
        floor = info.data.get("floor_s")
        if floor is not None and v * 2 > floor:
            raise ValueError(f"{v} is more than half of floor_s ({floor}): a beat could miss the deadline")
        return v


class RayPairSpec(Strict):
    """How a pair runs on Ray (``mergenet train --ray`` and grids); ignored by the engine."""

    source_workers: PositiveInt = 1
    target_workers: PositiveInt = 1
    use_gpu: bool = False
    gpus_per_worker: PositiveFloat | None = Field(
        None, description="use_gpu: GPUs per role worker (default 1); a fraction shares one GPU between "
                          "workers or trials (0.5: two per GPU, 0.25: four), above 1 a whole number; the "
                          "inline topology's trial process takes this many")
    cpus_per_worker: PositiveFloat = 1.0
    worker_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="extra (custom) Ray resources per worker, e.g. {accel_slot: 1}")
    adapter: AdapterPlacement = Field(default_factory=AdapterPlacement)
    mode: Literal["sync", "async"] = "sync"
    staleness: PositiveInt = Field(1, description="async: adapter output at most this many transfers old")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint")
    hang: HangSpec = Field(default_factory=HangSpec)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    topology: str = Field(
        "auto", description="grids: a registered topology (orchestrator/topology/): split = Ray Train role "
                            "workers + adapter actor; inline = the whole pair in the Tune trial process; auto = "
                            "split when the pair asks for GPUs, several workers per role, spread placement or "
                            "custom worker resources, else inline")

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is None:
            return v
        if not info.data.get("use_gpu"):
            raise ValueError("needs use_gpu: true")
        if v > 1 and v != int(v):
            raise ValueError(f"{v:g}: above 1 GPU a worker takes whole GPUs (1, 2, ...); fractions only below 1")
        return v

    @property
    def worker_gpus(self) -> float:
        """GPUs each role worker (or an inline trial's process) asks Ray for: 0 without ``use_gpu``."""
        return (self.gpus_per_worker or 1.0) if self.use_gpu else 0.0

    @field_validator("topology")
    @classmethod
    def _known_topology(cls, v: str) -> str:
        known = ["auto", *topology_modules()]
        if v not in known:
            raise ValueError(f"unknown topology '{short(v)}' (known: {', '.join(known)})")
        return v


def topology_modules() -> list[str]:
    """The topologies of ``orchestrator/topology/``: each is a module or folder there, registered
    under its own name (``tests/test_topology_contract.py`` checks it). Read from the folder, not
    imported: the topologies sit above this module and import it."""
    import pkgutil

    folder = Path(__file__).resolve().parent / "topology"
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if m.name not in ("base", "pbt"))


class PairConfig(ExperimentConfig):
    """A pair experiment as the orchestrator runs it (``mergenet train``, ``--ray``, grids)."""

    ray: RayPairSpec = Field(default_factory=RayPairSpec)


def parse_config(data: dict) -> PairConfig:
    """Validate a pair config mapping fully (schema, registries, method checks)."""
    return checks.parse_config(data, PairConfig)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PairConfig:
    """Read (``extends:``), override (``--set``) and fully validate a pair config file."""
    return checks.load_config(path, overrides, PairConfig)
