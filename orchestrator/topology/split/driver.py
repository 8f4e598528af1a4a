"""One pair on Ray: a Train V2 ``TorchTrainer`` whose workers take roles, plus an adapter actor.

The method's roles (:meth:`Method.roles`) decide the layout. Roles that may run
apart get their own workers: world ranks ``0 .. target_workers-1`` are the target role, the
rest the source role (so world rank 0, whose metrics Ray Train keeps, is the target's leader). Each role is
data-parallel inside its own process group (each worker takes a slice of the global batch,
gradients are averaged in the role's group). Role leaders send clones of their factors as
plain call arguments (inline when ≤ 100 KiB, else through the object store) to the shared
:class:`AdapterActor`, which holds the exchange the method builds (MergeNet's adapters); the
target leader broadcasts the generated matrices inside its role. Workers run
:func:`~mergenet_core.training.step.take_step` for their own role inside the core
:class:`~mergenet_core.training.loop.PairLoop` — the loop and step code the single-process engine runs.
Methods whose roles may not run apart (e.g. both models on one batch) run co-located in one
worker, which takes the step for the whole pair.

Every epoch world rank 0 gathers the records and role states and, when the loop's checkpoint
policy says so, reports one bundle (``pair.pt``, the same format as the engine's checkpoint)
through Ray Train checkpoints; after a worker or
adapter-actor failure Ray Train restarts the workers, they restore from the bundle (or start
afresh when none was registered yet) and world rank 0 starts a new *attempt* in the actor:
a fresh exchange with the initial adapters, loaded with the bundle's adapter state, under a
new attempt id that every adapter call carries (:class:`AdapterActor`). Nothing a killed
attempt left in the actor survives, so the adapters always match the workers' checkpoint
(see docs/RELIABILITY.md).
"""
from __future__ import annotations

import json
import posixpath
import shutil
import uuid
from pathlib import Path

import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mergenet_core.errors import ConfigError, MergenetError
from mergenet_core.io import PLACEMENT
from mergenet_core.io.outputs import RunOutputs
from mergenet_core.training.loop import KEEP_BUNDLES, load_bundle
from orchestrator.cluster.connect import ensure_ray
from orchestrator.config import PairConfig
from orchestrator.cluster.storage import Location

from .actor import AdapterActor
from .plan import PairPlan, WorkerJob, check_resources, plan_pair, worker_bundle
from .worker import BEST_FLAG, BUNDLE, pair_worker

def preflight(cfg: PairConfig, address: str | None = None, deep: bool = True,
              plan: PairPlan | None = None) -> PairPlan:
    """The pair's plan (``plan``, else made here), Ray reached, the cluster checked to hold it."""
    plan = plan or plan_pair(cfg, deep=deep)
    ensure_ray(address)
    check_resources(cfg, plan)
    return plan


# --------------------------------------------------------------------------- driver


def kept_bundles(result) -> dict:
    """``{"last": {"epoch", "path"}, "best_val": {...}}`` of a finished Train run (``best_val``
    only when a kept bundle is flagged as a best-validation epoch)."""
    out = {"last": {"epoch": int(result.metrics.get("epoch", 0)), "path": result.checkpoint.path}}
    flagged = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(BEST_FLAG) == 1]
    if flagged:
        c, m = max(flagged, key=lambda cm: cm[1].get("epoch", 0))
        out["best_val"] = {"epoch": int(m.get("epoch", 0)), "path": c.path}
    return out


def _checkpoint_config(keep: str) -> CheckpointConfig:
    """Ray Train always keeps the latest checkpoint; ``num_to_keep=1`` scored by
    :data:`BEST_FLAG` keeps, besides it, the latest bundle flagged as a new best-validation
    epoch — the best one."""
    if keep == "all":
        return CheckpointConfig()
    if keep == "last":
        return CheckpointConfig(num_to_keep=1)
    return CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=BEST_FLAG, checkpoint_score_order="max")


def _root_cause(e: BaseException) -> str:
    """The last meaningful line of a Ray Train failure (the worker's own error), shortened."""
    from mergenet_core.errors import short

    lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.strip().startswith(("[Rank", "File "))]
    return short(lines[-1] if lines else type(e).__name__, 200)


def _last_hang(out: Path) -> str | None:
    """The reason of the last hang a worker found (``events.jsonl``): a worker that finds one
    exits, so Ray's own error only says that it died."""
    try:
        lines = (out / "events.jsonl").read_text().splitlines()
    except OSError:
        return None
    hangs = [e for e in map(json.loads, filter(None, lines)) if e.get("event") == "hang"]
    return f"hang: {hangs[-1]['reason']} (ray.hang)" if hangs else None


def _forget_beats(run: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    from .watchdog import NAMESPACE, key_prefix

    try:
        _internal_kv_del(key_prefix(run), del_by_prefix=True, namespace=NAMESPACE)
    except Exception:  # noqa: BLE001 - best effort: a few bytes in the GCS
        pass


def run_pair_on_ray(cfg: PairConfig, out_dir: str | Path, address: str | None = None, resume: bool = False,
                    plan: PairPlan | None = None, storage_path: str | None = None, name: str = "pair",
                    callbacks: list | None = None, start_from: str | Path | Checkpoint | None = None,
                    until_epoch: int | None = None, storage_filesystem=None,
                    keep_bundles: str = "last_and_best") -> dict:
    """Run one pair through the Ray topology; returns the same summary as the engine.

    ``out_dir``: a local folder for the pair's outputs (``metrics.jsonl``, ``final.json``,
    ``placement.json``, ``config.json``; written here from the final checkpoint, so it need not
    be shared with the workers); ``storage_path`` (+ ``storage_filesystem`` for a bucket, as in
    Ray's ``RunConfig``): where the Train run and its checkpoints live;
    ``start_from``: a folder holding a ``pair.pt`` bundle, or a checkpoint in storage, to start
    from (PBT segments); ``until_epoch``: stop after this epoch (the summary covers the epochs
    so far); ``keep_bundles``: which checkpoints the run keeps (:data:`KEEP_BUNDLES`)."""
    if keep_bundles not in KEEP_BUNDLES:  # before any Ray work
        raise ConfigError("keep_bundles", f"'{keep_bundles}' is not one of {', '.join(KEEP_BUNDLES)}")
    out = Path(out_dir).resolve()
    plan = plan or preflight(cfg, address)
    ensure_ray(address)
    storage = storage_path or str(out / "ray")
    if not resume:  # a fresh run: no Train run of this name left to restore from
        previous = posixpath.join(storage, name)
        where = Location(storage_filesystem, previous, previous) if storage_filesystem else Location.parse(previous)
        where.delete()
    outputs = RunOutputs(out)
    outputs.begin(cfg, fresh=not resume)
    actor, actor_name = _start_actor(cfg, plan, out)
    # hang detection (watchdog.py): needs someone to wait for, a peer or the actor
    watch = uuid.uuid4().hex if cfg.ray.hang.enabled and (plan.num_workers > 1 or actor is not None) else None
    job = WorkerJob(cfg, out, plan, actor_name, ray.get_runtime_context().namespace if actor else None, watch,
                    until_epoch, keep_bundles, _start_point(start_from))
    run_config = RunConfig(name=name, storage_path=storage, storage_filesystem=storage_filesystem,
                           failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                           callbacks=callbacks or None, checkpoint_config=_checkpoint_config(keep_bundles),
                           # no INFO line per report/checkpoint on the console (warnings and errors stay)
                           logging_config=LoggingConfig(log_level="WARNING"))
    try:
        result = _trainer(job, run_config).fit()
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        raise MergenetError(f"pair {cfg.name}: training failed after {cfg.ray.max_failures} restart(s) "
                            f"(ray.max_failures): {_last_hang(out) or _root_cause(e)}") from None
    finally:
        if actor is not None:
            ray.kill(actor)
        if watch is not None:
            _forget_beats(watch)
    return _collect(result, outputs, out, keep=start_from is not None or until_epoch is not None)


def _start_point(start_from):
    """A checkpoint in bucket storage as Ray's ``Checkpoint``, a folder as its path, or nothing."""
    if hasattr(start_from, "filesystem"):
        return Checkpoint(path=start_from.path, filesystem=start_from.filesystem)
    return str(start_from) if start_from else None


def _start_actor(cfg: PairConfig, plan: PairPlan, out: Path):
    """The adapter actor (when the roles run apart and talk), named so that workers find it."""
    if plan.exchange_spec is None or plan.co_located:
        return None, None
    rs = cfg.ray
    name = f"mergenet-adapter-{uuid.uuid4().hex[:8]}"
    actor = AdapterActor.options(name=name, max_restarts=-1, max_concurrency=16, num_cpus=rs.adapter.num_cpus,
                                 num_gpus=rs.adapter.num_gpus).remote(cfg, plan.exchange_spec, plan.steps_per_epoch)
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / "adapter.pid").write_text(str(ray.get(actor.pid.remote())))
    return actor, name


def _trainer(job: WorkerJob, run_config: RunConfig) -> TorchTrainer:
    rs = job.cfg.ray
    return TorchTrainer(
        pair_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=job.plan.num_workers, use_gpu=rs.use_gpu,
                                     resources_per_worker=worker_bundle(job.cfg), placement_strategy=rs.placement),
        # NCCL (Ray Train's choice with GPUs) refuses two ranks on one GPU: a fraction of a GPU per
        # worker uses gloo (small objects and gradient all-reduces; gloo handles CUDA tensors)
        torch_config=TorchConfig(backend="gloo") if rs.use_gpu and rs.worker_gpus < 1 else None,
        run_config=run_config)


def _collect(result, outputs: RunOutputs, out: Path, keep: bool) -> dict:
    """What rank 0 wrote, from the final checkpoint (rank 0 may be on another node); ``keep``: the
    bundle stays in ``out`` for the caller (PBT)."""
    with result.checkpoint.as_directory() as d:
        history = load_bundle(Path(d) / BUNDLE)["history"]
        placement = json.loads((Path(d) / PLACEMENT).read_text()) if (Path(d) / PLACEMENT).exists() else None
        if keep:
            shutil.copy2(Path(d) / BUNDLE, out / BUNDLE)
    return outputs.finish(history=history, kept=kept_bundles(result), placement=placement)
