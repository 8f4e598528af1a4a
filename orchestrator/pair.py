"""One pair on Ray: a Train V2 ``TorchTrainer`` whose workers take roles, plus an adapter actor.

The method's placement (:meth:`Method.placement`) decides the layout. Roles that may run
apart get their own workers: world ranks ``0 .. target_workers-1`` are the target role, the
rest the source role (so world rank 0, whose metrics Ray Train keeps, is the target's leader). Each role is
data-parallel inside its own process group (each worker takes a slice of the global batch,
gradients are averaged in the role's group). Role leaders send clones of their factors as
plain call arguments (inline when ≤ 100 KiB, else through the object store) to the shared
:class:`AdapterActor`, which holds the exchange the method builds (MergeNet's adapters); the
target leader broadcasts the generated matrices inside its role. Workers run
:meth:`Method.role_step` inside the core :class:`~mergenet_core.loop.PairLoop` — the loop and
step code the single-process engine runs. Methods whose roles may not run apart (both models
on one batch) run co-located in one worker through :meth:`Method.pair_step`.

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
import os
import posixpath
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestrator.config import PairConfig, worker_layout
from mergenet_core.errors import ConfigError, MergenetError
from mergenet_core.loop import (FINAL, KEEP_BUNDLES, METRICS, PairLoop, PairState, build_method, load_bundle,
                                numeric, save_bundle, summarise, write_metrics)
from orchestrator.storage import Location

BUNDLE = "pair.pt"
PLACEMENT = "placement.json"  # role, rank, node id, pid and device of every worker

#: which pair bundles (Ray Train checkpoints) a run keeps, and so writes
#: (:data:`mergenet_core.loop.KEEP_BUNDLES`, written by the loop's checkpoint policy):
#: ``last_and_best``: the last and the best-validation one (the earliest epoch of the highest
#: ``target/val_acc``, as in ``final.json``); ``last``: only the last; ``all``: every bundle written
BEST_FLAG = "checkpoint/best_val"  # 1 on the bundle of a new best-validation epoch (Ray's score)
BUNDLES = "bundles.json"  # where the kept bundles are: {"last": {...}, "best_val": {...}}

#: environment every Ray worker of ours gets
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

#: ``strict``: refuse a pair the cluster cannot hold now; ``warn``: print one line and go on
#: (the autoscaler may add the nodes). ``ensure_ray`` sets ``warn`` when it attaches to a
#: cluster by address, unless the user set it; a Ray started here (or in-process) stays strict.
RESOURCE_CHECK_ENV = "MERGENET_RESOURCE_CHECK"


#: MLflow settings a worker needs; nothing else of the environment is forwarded (credentials
#: such as MLFLOW_TRACKING_PASSWORD / _TOKEN stay where they are: workers read them from the
#: node's own environment or ``~/.mlflow/credentials``, never from a runtime env)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                 RESOURCE_CHECK_ENV)

#: seconds to reach a Ray address before giving up (a dead address otherwise waits minutes)
CONNECT_TIMEOUT_S = 10.0


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The env vars every Ray worker of ours gets: :data:`WORKER_ENV` and the allow-listed
    :data:`FORWARDED_ENV`; a tracking URI carrying ``user:password@`` is refused."""
    from orchestrator.secrets import check_no_credentials

    environ = os.environ if environ is None else environ
    env = {**WORKER_ENV, **{k: environ[k] for k in FORWARDED_ENV if k in environ}}
    for k, v in env.items():
        check_no_credentials(k, v)
    return env


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a local Ray bound to 127.0.0.1.
    An address nobody answers on fails within :data:`CONNECT_TIMEOUT_S` with one line."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.setdefault(RESOURCE_CHECK_ENV, "warn")  # a cluster reached by address may autoscale
    env = {"env_vars": worker_env()}
    if address:
        from orchestrator.secrets import probe_address

        probe_address(address, CONNECT_TIMEOUT_S)
        # something answers: give Ray's own GCS handshake a bounded number of 1 s attempts too
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(CONNECT_TIMEOUT_S)))
        try:
            ray.init(address=address, runtime_env=env, **init_kwargs)
        except (ConnectionError, TimeoutError) as e:
            from mergenet_core.errors import MergenetError, short

            raise MergenetError(f"--address {short(address)}: no Ray cluster answers there "
                                f"({short(str(e).splitlines()[0] if str(e) else type(e).__name__, 100)})") from None
    else:
        init_kwargs.setdefault("include_dashboard", os.environ.get("MERGENET_RAY_DASHBOARD", "1") != "0")
        ray.init(address="local", dashboard_host="127.0.0.1", runtime_env=env, **init_kwargs)


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


def plan_pair(cfg: PairConfig) -> PairPlan:
    """Build the pair once on CPU in this process: every config error (layer pair names,
    ranks, data) surfaces here, before any Ray worker starts."""
    pair = PairState.build(cfg, devices={n: torch.device("cpu") for n in ("source", "target")})
    method = pair.method
    where = method.placement()
    layout = worker_layout(cfg, where)
    spec = method.exchange_spec() if where.apart else None
    return PairPlan(layout, not where.apart, spec, pair.steps_per_epoch, method.config_warnings(pair.roles))


def check_resources(cfg: PairConfig, plan: PairPlan) -> None:
    """Refuse a pair that the connected cluster cannot hold now — on a Ray started here. On a
    cluster reached by address (``MERGENET_RESOURCE_CHECK=warn``, see :data:`RESOURCE_CHECK_ENV`)
    the autoscaler may still add the nodes: print one warning line per shortfall instead (Ray
    Train then waits for the resources)."""
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
        need_gpu = plan.num_workers + (rs.adapter.num_gpus if plan.exchange_spec is not None else 0)
        if need_gpu > total.get("GPU", 0) + 1e-9:
            problems.append(ConfigError("ray.use_gpu", f"the pair needs {need_gpu:g} GPUs (one per worker) but the "
                                                       f"cluster has {total.get('GPU', 0):g}"))
    if not problems:
        return
    if os.environ.get(RESOURCE_CHECK_ENV, "strict").lower() != "warn":
        raise problems[0]
    for p in problems:
        print(f"warning: {p} now; waiting for the autoscaler to add nodes "
              f"({RESOURCE_CHECK_ENV}=strict refuses instead)", file=sys.stderr, flush=True)


def preflight(cfg: PairConfig, address: str | None = None) -> PairPlan:
    plan = plan_pair(cfg)
    ensure_ray(address)
    check_resources(cfg, plan)
    return plan


# --------------------------------------------------------------------------- adapter actor


class StaleAttempt(RuntimeError):
    """A call from a worker-group attempt that is no longer the current one (or to an adapter
    actor restarted since): the caller must restart from the last checkpoint."""


@ray.remote
class AdapterActor:
    """The pair method's exchange (MergeNet: the adapters and their optimisers) behind Ray
    calls, built by the method itself (:meth:`Method.build_exchange`).

    Every worker-group attempt starts with :meth:`begin`: a *fresh* exchange (initial adapter
    state: no pending inputs, outputs or updates of a killed attempt survive) loaded with the
    adapter state of the checkpoint the workers restart from, under a new attempt id. Calls
    carry that id; a call of an older attempt (a killed worker's late message, or any call after
    this actor itself was restarted and lost its state) raises :class:`StaleAttempt` and never
    touches the current adapters. So the adapter state always matches the workers' checkpoint.
    """

    def __init__(self, cfg_json: str, spec: dict, steps_per_epoch: int):
        import threading

        self.cfg = PairConfig.model_validate_json(cfg_json)
        self.spec, self.steps_per_epoch = spec, steps_per_epoch
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.attempt: str | None = None
        self.exchange = None
        self._lock = threading.Lock()

    def _fresh_exchange(self):
        rs = self.cfg.ray
        return build_method(self.cfg).build_exchange(self.spec, self.steps_per_epoch, self.device,
                                                     staleness=rs.staleness if rs.mode == "async" else 0)

    def begin(self, attempt: str) -> None:
        """Start attempt ``attempt`` from the initial exchange state (world rank 0 then loads the
        restored checkpoint's method state through :meth:`load_state_dict`)."""
        ex = self._fresh_exchange()
        with self._lock:
            old, self.exchange, self.attempt = self.exchange, ex, attempt
        if old is not None and hasattr(old, "abandon"):  # wake every call still waiting there
            old.abandon(StaleAttempt("superseded by a new attempt"))

    def _ex(self, attempt: str):
        with self._lock:
            if attempt != self.attempt or self.exchange is None:
                raise StaleAttempt(f"adapter call of attempt {attempt[:8]} but the current attempt is "
                                   f"{(self.attempt or 'none (actor restarted)')[:30]}")
            return self.exchange

    def put(self, attempt: str, step: int, keys: list, *mats) -> None:
        self._ex(attempt).put(step, {tuple(k): m for k, m in zip(keys, mats)})

    def get(self, attempt: str, step: int, role: str):
        gen, out = self._ex(attempt).get(step, role)
        return gen, {k: (v.cpu() if v is not None else None) for k, v in out.items()}

    def feedback(self, attempt: str, gen_step: int, keys: list, epoch: int, *grads) -> None:
        self._ex(attempt).feedback(gen_step, dict(zip(keys, grads)), epoch)

    def take_epoch_metrics(self, attempt: str) -> dict:
        return self._ex(attempt).take_epoch_metrics()

    def state_dict(self, attempt: str) -> dict:
        return _to_cpu(self._ex(attempt).state_dict())

    def load_state_dict(self, attempt: str, state: dict) -> None:
        self._ex(attempt).load_state_dict(state)

    def pid(self) -> int:
        return os.getpid()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class RayExchange:
    """Worker-side proxy with the exchange API (:class:`~mergenet_core.methods.base.ExchangeAPI`). Only the role leader talks to the
    actor; generated matrices are broadcast to the rest of the role. Every call carries the
    attempt id the actor was started with (:meth:`AdapterActor.begin`)."""

    def __init__(self, actor, leader: bool, group=None, leader_rank: int = 0, sync: bool = True,
                 attempt: str = ""):
        self.actor, self.leader, self.group, self.leader_rank, self.sync = actor, leader, group, leader_rank, sync
        self.attempt = attempt

    def put(self, step: int, mats: dict) -> None:
        if self.leader:
            keys = list(mats)
            # plain arguments: Ray inlines objects <= 100 KiB in the call message (a rank-r
            # factor usually is); an explicit ray.put first cost an object-store round trip
            self.actor.put.remote(self.attempt, step, keys, *[mats[k].detach().cpu().clone() for k in keys])

    def get(self, step: int, role: str):
        box = [None]
        if self.leader:
            box[0] = ray.get(self.actor.get.remote(self.attempt, step, role))
        if self.group is not None:
            dist.broadcast_object_list(box, src=self.leader_rank, group=self.group)
        return box[0]

    def feedback(self, gen_step: int, grads: dict, epoch: int) -> None:
        if self.leader:
            keys = list(grads)
            ref = self.actor.feedback.remote(self.attempt, gen_step, keys, epoch,
                                             *[grads[k].detach().cpu() for k in keys])
            if self.sync:
                ray.get(ref)

    def take_epoch_metrics(self) -> dict:
        return ray.get(self.actor.take_epoch_metrics.remote(self.attempt))

    def state_dict(self) -> dict:
        return ray.get(self.actor.state_dict.remote(self.attempt))

    def load_state_dict(self, state: dict) -> None:
        ray.get(self.actor.load_state_dict.remote(self.attempt, state))


# --------------------------------------------------------------------------- worker


def _grad_sync(group, size: int):
    def sync(model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(size)
    return sync


def _mark(out: Path, what: str, role: str, role_rank: int, epoch: int) -> None:
    """Append one timestamped event line (``events.jsonl``; fault-recovery timing and tests)."""
    try:
        with (out / "events.jsonl").open("a") as f:
            f.write(json.dumps({"t": time.time(), "event": what, "worker": f"{role}{role_rank}",
                                "pid": os.getpid(), "epoch": epoch}) + "\n")
    except OSError:
        pass


class RoleWorkerHost:
    """The :class:`~mergenet_core.loop.Host` of one Ray Train worker: its role (or the whole
    pair, co-located), data parallel inside the role's process group; world rank 0 (the
    target's leader) leads: it assembles records and reports bundles as Ray Train checkpoints."""

    def __init__(self, pair: PairState, me: str, co_located: bool, rank: int, role_leader: bool,
                 world: int, out: Path, placement: list, role_rank: int):
        self.pair, self.me, self.co_located = pair, me, co_located
        self.lead, self.role_leader = rank == 0, role_leader
        self.distributed = world > 1
        self.world, self.out, self.placement, self.role_rank = world, out, placement, role_rank
        self._states: dict = {}
        self._checkpoint = None

    def step(self, step: int) -> None:
        if self.co_located:
            self.pair.method.pair_step(step, self.pair.roles)
        else:
            self.pair.method.role_step(step, self.pair.roles[self.me])

    def gather(self, local: dict) -> dict | None:
        # role states travel with the records: whether a bundle is due is known only on the lead
        states = {n: _to_cpu(self.pair.role_state(n)) for n in self.pair.roles} if self.role_leader else {}
        if self.distributed:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (local, states))
        else:
            gathered = [(local, states)]
        if not self.lead:
            return None
        parts, self._states = {}, {}
        for m, s in gathered:
            parts.update(m)
            self._states.update(s)
        return parts

    def role_states(self) -> dict:
        return self._states

    def on_record(self, record: dict) -> None:
        pass  # reported with the epoch's bundle (end_epoch): Ray Train keeps them together

    def save(self, bundle: dict, record: dict, best: bool) -> None:
        bundle["method"] = _to_cpu(bundle["method"])
        tmp = Path(tempfile.mkdtemp(prefix="mergenet-ckpt-"))
        save_bundle(tmp / BUNDLE, bundle)
        # the placement travels with the checkpoint: the driver may sit on another node than
        # rank 0 (bucket storage, no shared folder)
        (tmp / PLACEMENT).write_text(json.dumps(self.placement, indent=2))
        self._checkpoint = Checkpoint.from_directory(str(tmp))

    def end_epoch(self, record: dict | None, saved: bool, best: bool) -> None:
        import ray.train

        pair = self.pair
        record = record or {"epoch": pair.epoch, "step": pair.step}
        metrics = numeric(record)
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is not None:
            metrics[BEST_FLAG] = int(best)
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            _mark(self.out, "reported", self.me, self.role_rank, pair.epoch)


def pair_worker(config: dict) -> None:
    """Ray Train worker: one role (or the whole pair when co-located) running the core loop."""
    import ray.train
    import ray.train.torch

    cfg = PairConfig.model_validate(config["experiment"])
    out = Path(config["out_dir"])
    layout: list[str] = config["layout"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    distributed = dist.is_available() and dist.is_initialized() and len(layout) > 1
    me = layout[rank]
    ranks = {r: [i for i, x in enumerate(layout) if x == r] for r in dict.fromkeys(layout)}
    groups = {r: dist.new_group(ranks=rr) for r, rr in ranks.items()} if distributed else {}
    role_rank = ranks[me].index(rank)
    leader = role_rank == 0
    device = ray.train.torch.get_device()

    names = None if config["co_located"] else (me,)
    pair = PairState.build(cfg, role_names=names, devices={"source": device, "target": device})
    method = pair.method
    if not config["co_located"]:
        role = pair.roles[me]
        if len(ranks[me]) > 1:
            role.shard = (role_rank, len(ranks[me]))
            role.grad_sync = _grad_sync(groups[me], len(ranks[me]))
    actor = proxy = None
    if config.get("actor"):
        actor = ray.get_actor(config["actor"], namespace=config["namespace"])
        group = groups.get(me) if len(ranks[me]) > 1 else None
        proxy = RayExchange(actor, leader, group, ranks[me][0], sync=cfg.ray.mode == "sync")
        method.attach(proxy)

    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"{me}{role_rank}.pid").write_text(str(os.getpid()))
    where = {"role": me, "role_rank": role_rank, "world_rank": rank, "pid": os.getpid(),
             "node_id": ray.get_runtime_context().get_node_id(), "device": str(device)}
    placement = [None] * len(layout)
    if distributed:
        dist.all_gather_object(placement, where)
    else:
        placement = [where]
    if rank == 0:
        (out / PLACEMENT).write_text(json.dumps(placement, indent=2))

    ckpt = ray.train.get_checkpoint()  # this run's own latest (after a restart), else the start bundle
    if ckpt is None and config.get("start_from"):
        start = config["start_from"]  # a local/shared folder, or a Checkpoint in bucket storage
        ckpt = start if isinstance(start, Checkpoint) else Checkpoint.from_directory(start)
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_bundle(Path(d) / BUNDLE)
        pair.load_state_dict(state, method=proxy is None and rank == 0)
    if proxy is not None:
        # a new attempt: the actor drops whatever a killed attempt left (pending inputs, outputs,
        # updates) and starts from the initial adapter state, then takes the checkpoint's
        box = [uuid.uuid4().hex if rank == 0 else None]
        if rank == 0:
            ray.get(actor.begin.remote(box[0]))
            if state is not None:
                proxy.attempt = box[0]
                method.load_state_dict(state["method"])
        if distributed:
            dist.broadcast_object_list(box, src=0)
        proxy.attempt = box[0]
    if distributed:
        dist.barrier()  # the actor holds the restored exchange before anyone transfers
    _mark(out, "started", me, role_rank, pair.epoch)

    host = RoleWorkerHost(pair, me, config["co_located"], rank, leader, len(layout), out, placement, role_rank)
    PairLoop(host, keep_bundles=config.get("keep_bundles", "last_and_best"), until_epoch=config.get("until_epoch"),
             metrics_path=out / METRICS if rank == 0 else None).run()


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
    if not resume:
        previous = posixpath.join(storage, name)
        (Location.parse(previous) if storage_filesystem is None
         else Location(storage_filesystem, previous, previous)).delete()
        for f in (METRICS, FINAL):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    rs = cfg.ray
    actor_name = namespace = None
    actor = None
    if plan.exchange_spec is not None and not plan.co_located:
        actor_name, namespace = f"mergenet-adapter-{uuid.uuid4().hex[:8]}", ray.get_runtime_context().namespace
        actor = AdapterActor.options(name=actor_name, max_restarts=-1, max_concurrency=16,
                                     num_cpus=rs.adapter.num_cpus, num_gpus=rs.adapter.num_gpus).remote(
            cfg.model_dump_json(), plan.exchange_spec, plan.steps_per_epoch)
        (out / "pids").mkdir(parents=True, exist_ok=True)
        (out / "pids" / "adapter.pid").write_text(str(ray.get(actor.pid.remote())))
    per_worker = {"CPU": rs.cpus_per_worker, **rs.worker_resources}
    trainer = TorchTrainer(
        pair_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "out_dir": str(out), "layout": plan.layout,
                           "co_located": plan.co_located, "actor": actor_name, "namespace": namespace,
                           "until_epoch": until_epoch, "keep_bundles": keep_bundles,
                           "start_from": (Checkpoint(path=start_from.path, filesystem=start_from.filesystem)
                                          if hasattr(start_from, "filesystem") else
                                          str(start_from) if start_from else None)},
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=rs.use_gpu,
                                     resources_per_worker=per_worker, placement_strategy=rs.placement),
        run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=rs.max_failures), callbacks=callbacks or None,
                             checkpoint_config=_checkpoint_config(keep_bundles),
                             # no INFO line per report/checkpoint on the console (warnings and errors stay)
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        raise MergenetError(f"pair {cfg.name}: training failed after {rs.max_failures} restart(s) "
                            f"(ray.max_failures): {_root_cause(e)}") from None
    finally:
        if actor is not None:
            ray.kill(actor)
    with result.checkpoint.as_directory() as d:
        history = load_bundle(Path(d) / BUNDLE)["history"]
        if (Path(d) / PLACEMENT).exists():
            shutil.copy2(Path(d) / PLACEMENT, out / PLACEMENT)
        if start_from is not None or until_epoch is not None:  # keep the bundle for the caller (PBT)
            shutil.copy2(Path(d) / BUNDLE, out / BUNDLE)
    write_metrics(out / METRICS, history)  # what rank 0 wrote, from the checkpoint (rank 0 may be elsewhere)
    final = summarise([r for r in history if "target/val_acc" in r])
    (out / FINAL).write_text(json.dumps(final, indent=2))
    (out / BUNDLES).write_text(json.dumps(kept_bundles(result), indent=2))
    return final
