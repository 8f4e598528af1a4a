"""The split pair's plan, made in the driver before any Ray worker starts: the role of each
worker, the exchange the adapter actor hosts, the steps per epoch, what each worker asks Ray for,
and the check that the connected cluster can hold it now. Imports no Ray at module level."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mergenet_core.errors import ConfigError
from mergenet_core.training.loop import PairState

if TYPE_CHECKING:
    from orchestrator.config import PairConfig


def worker_layout(cfg: PairConfig, roles) -> list[str]:
    """The role of each Ray Train worker (world rank order) for the method's ``roles``: roles
    that may run apart get their own workers (the target's first, so world rank 0 is the
    target's leader); otherwise one worker hosts the whole pair."""
    rs = cfg.ray
    workers = {"target": rs.target_workers, "source": rs.source_workers}
    if roles.apart:
        for role, n in workers.items():
            if n > 1 and role not in roles.needed:
                raise ConfigError(f"ray.{role}_workers", f"method '{cfg.method.name}' has no {role} role "
                                                         f"here; set {role}_workers to 1")
        return [r for r in ("target", "source") if r in roles.needed for _ in range(workers[r])]
    if rs.source_workers > 1 or rs.target_workers > 1:
        raise ConfigError("ray.target_workers", f"method '{cfg.method.name}' runs both models in one "
                                                "worker; set source_workers and target_workers to 1")
    return ["target"]


# --------------------------------------------------------------------------- plan


@dataclass
class PairPlan:
    layout: list[str]            # role of each world rank
    co_located: bool             # one worker runs every role (methods whose roles may not run apart)
    exchange_spec: dict | None   # the method's exchange (built in the adapter actor), if its roles talk
    steps_per_epoch: int
    warnings: list[str] = field(default_factory=list)  # method.config_warnings (risky layer pairs)

    @property
    def num_workers(self) -> int:
        return len(self.layout)


def plan_pair(cfg: PairConfig, deep: bool = True) -> PairPlan:
    """Plan the pair in this process, before any Ray worker starts: its worker layout, the
    exchange's spec and the steps per epoch. ``deep``: build the whole pair on CPU (every config
    error surfaces here, data and weights included); else the weightless build of fast
    validation (data probed, models on the meta device: a grid trial whose grid was validated
    already, and whose workers build the real pair anyway)."""
    if deep:
        pair = PairState.build(cfg, devices={n: torch.device("cpu") for n in ("source", "target")})
    else:
        pair = PairState.build(cfg, weightless=True)
    method = pair.method
    where = method.roles(method.options)
    layout = worker_layout(cfg, where)
    spec = method.exchange_spec() if where.apart else None
    return PairPlan(layout, not where.apart, spec, pair.steps_per_epoch, method.config_warnings(pair.roles))


def worker_bundle(cfg: PairConfig) -> dict[str, float]:
    """What each role worker asks Ray for (Ray Train's ``resources_per_worker``: one bundle per
    worker in the worker group's placement group, strategy ``ray.placement``): its CPUs, its
    custom resources and, with ``ray.use_gpu``, ``ray.worker_gpus`` GPUs (1, or the
    ``ray.gpus_per_worker`` fraction that packs several workers on one GPU)."""
    rs = cfg.ray
    bundle = {"CPU": rs.cpus_per_worker, **rs.worker_resources}
    if rs.use_gpu:
        bundle["GPU"] = rs.worker_gpus
    return bundle


def check_resources(cfg: PairConfig, plan: PairPlan) -> None:
    """Refuse a pair that the connected cluster cannot hold now — on a Ray started here. On a
    cluster reached by address (``MERGENET_RESOURCE_CHECK=warn``, see :data:`RESOURCE_CHECK_ENV`)
    the autoscaler may still add the nodes: print one warning line per shortfall instead (Ray
    Train then waits for the resources)."""
    import ray

    from orchestrator.cluster.connect import RESOURCE_CHECK_ENV

    total = ray.cluster_resources()
    rs = cfg.ray
    problems: list[ConfigError] = []
    need_cpu = plan.num_workers * rs.cpus_per_worker + (rs.adapter.num_cpus if plan.exchange_spec is not None else 0)
    if need_cpu > total.get("CPU", 0) + 1e-9:
        problems.append(ConfigError("ray.cpus_per_worker", f"the pair needs {need_cpu:g} CPUs ({plan.num_workers} "
                                    f"workers x {rs.cpus_per_worker:g}) but the cluster has {total.get('CPU', 0):g}"))
    for res, amount in rs.worker_resources.items():
        need = plan.num_workers * amount
        if need > total.get(res, 0) + 1e-9:
            problems.append(ConfigError(f"ray.worker_resources.{res}", f"the pair needs {need:g} '{res}' but the "
                                                                      f"cluster has {total.get(res, 0):g}"))
    if rs.use_gpu:
        problems += _gpu_problems(rs, plan, total)
    if not problems:
        return
    if os.environ.get(RESOURCE_CHECK_ENV, "strict").lower() != "warn":
        raise problems[0]
    for p in problems:
        print(f"warning: {p} now; waiting for the autoscaler to add nodes "
              f"({RESOURCE_CHECK_ENV}=strict refuses instead)", file=sys.stderr, flush=True)


def _gpu_problems(rs, plan: PairPlan, total: dict) -> list[ConfigError]:
    """The pair's GPUs against the cluster's: the whole pair (workers x ``ray.worker_gpus`` + the
    adapter actor's), one worker against the largest node (a worker never spans nodes), and under
    ``STRICT_PACK`` the worker group against the largest node."""
    per, field = rs.worker_gpus, "ray.gpus_per_worker" if rs.gpus_per_worker is not None else "ray.use_gpu"
    adapter = rs.adapter.num_gpus if plan.exchange_spec is not None else 0
    need = plan.num_workers * per + adapter
    have = total.get("GPU", 0)
    how = f"{plan.num_workers} workers x {per:g}" + (f" + {adapter:g} for the adapter" if adapter else "")
    if need > have + 1e-9:
        return [ConfigError(field, f"the pair needs {need:g} GPUs ({how}) but the cluster has {have:g}")]
    import ray

    node_max = max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if per > node_max + 1e-9:
        return [ConfigError(field, f"one worker needs {per:g} GPUs but the largest node has {node_max:g}")]
    workers = plan.num_workers * per  # the worker group's placement group (the actor is apart)
    if rs.placement == "STRICT_PACK" and workers > node_max + 1e-9:
        return [ConfigError("ray.placement", f"STRICT_PACK puts the workers' {workers:g} GPUs on one node "
                                             f"but the largest node has {node_max:g}")]
    return []


@dataclass(frozen=True)
class WorkerJob:
    """What every Ray Train worker of one pair receives from the driver, as objects (nothing to
    parse again): the validated config, the output folder, the plan, the adapter actor's name
    and namespace, the hang watch's id, where to stop and which bundles to keep, the start bundle."""

    cfg: PairConfig
    out: Path
    plan: PairPlan
    actor: str | None = None
    namespace: str | None = None
    watch: str | None = None
    until_epoch: int | None = None
    keep_bundles: str = "last_and_best"
    start_from: Any = None

