"""The Ray Train worker of a pair: one role (or the whole pair, co-located) running the core
:class:`~mergenet_core.training.loop.PairLoop`, data parallel inside its role's process group; world
rank 0 (the target's leader) reports each epoch's bundle as a Ray Train checkpoint."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from mergenet_core.io import PAIR_BUNDLE as BUNDLE
from mergenet_core.io.outputs import RunOutputs
from mergenet_core.training.loop import PairLoop, PairState, load_bundle, numeric, save_bundle
from mergenet_core.training.step import take_step
from .actor import RayExchange, _to_cpu
from .plan import WorkerJob
from .watchdog import Watchdog, mark


#: which pair bundles (Ray Train checkpoints) a run keeps, and so writes
#: (:data:`mergenet_core.training.loop.KEEP_BUNDLES`, written by the loop's checkpoint policy):
#: ``last_and_best``: the last and the best-validation one (the earliest epoch of the highest
#: ``target/val_acc``, as in ``final.json``); ``last``: only the last; ``all``: every bundle written
BEST_FLAG = "checkpoint/best_val"  # 1 on the bundle of a new best-validation epoch (Ray's score)


def _grad_sync(group, size: int):
    def sync(model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(size)
    return sync


class RoleWorkerHost:
    """The :class:`~mergenet_core.training.loop.Host` of one Ray Train worker: its role (or the whole
    pair, co-located), data parallel inside the role's process group; world rank 0 (the
    target's leader) leads: it assembles records and reports bundles as Ray Train checkpoints."""

    def __init__(self, pair: PairState, me: str, rank: int, role_leader: bool,
                 world: int, out: Path, placement: list, role_rank: int, watch: Watchdog | None = None):
        self.pair, self.me, self.watch = pair, me, watch
        self.lead, self.role_leader = rank == 0, role_leader
        self.distributed = world > 1
        self.world, self.out, self.placement, self.role_rank = world, out, placement, role_rank
        self._states: dict = {}
        self._checkpoint = None

    def step(self, step: int) -> None:
        t0 = time.perf_counter()
        take_step(self.pair, step)  # the roles built here: its own, or the co-located pair
        if self.watch is not None:
            self.watch.stepped(time.perf_counter() - t0)

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
        RunOutputs(tmp).placement(self.placement)
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
            mark(self.out, "reported", self.me, self.role_rank, pair.epoch)


def _begin(actor, attempt: str, proxy: RayExchange) -> None:
    """Start attempt ``attempt`` in the adapter actor, waiting for an actor that is restarting
    (the previous attempt found it stuck and killed it); the watchdog bounds the wait."""
    with proxy.waiting("begin"):
        while True:
            try:
                return ray.get(actor.begin.remote(attempt))
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.5)


@dataclass
class _Seat:
    """Where this worker sits: its world rank, role, rank in the role, the role groups."""

    rank: int
    me: str
    role_rank: int
    ranks: dict[str, list[int]]
    groups: dict
    distributed: bool

    @property
    def leader(self) -> bool:
        return self.role_rank == 0


def _seat(layout: list[str]) -> _Seat:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    distributed = dist.is_available() and dist.is_initialized() and len(layout) > 1
    me = layout[rank]
    ranks = {r: [i for i, x in enumerate(layout) if x == r] for r in dict.fromkeys(layout)}
    groups = {r: dist.new_group(ranks=rr) for r, rr in ranks.items()} if distributed else {}
    return _Seat(rank, me, ranks[me].index(rank), ranks, groups, distributed)


def pair_worker(config: dict) -> None:
    """Ray Train worker: one role (or the whole pair when co-located) running the core loop.
    ``config["job"]``: the :class:`~.plan.WorkerJob` the driver made (objects, nothing to parse)."""
    import ray.train.torch

    job: WorkerJob = config["job"]
    cfg, out, layout = job.cfg, job.out, job.plan.layout
    seat = _seat(layout)
    device = ray.train.torch.get_device()
    watch = None
    if job.watch:  # from the start: a peer may stop while this one builds or restores
        watch = Watchdog(cfg.ray.hang, job.watch, seat.rank, len(layout), seat.me, seat.role_rank, out).start()
    try:
        names = None if job.plan.co_located else (seat.me,)
        pair = PairState.build(cfg, role_names=names, devices={"source": device, "target": device},
                               steps_per_epoch=job.plan.steps_per_epoch)
        proxy, actor = _attach(job, pair, seat, watch)
        placement = _placement(out, seat, len(layout), device)
        state = _restore(job, pair, proxy is None and seat.rank == 0)
        if proxy is not None:
            _begin_attempt(actor, proxy, pair, seat, state)
        if seat.distributed:
            dist.barrier()  # the actor holds the restored exchange before anyone transfers
        mark(out, "started", seat.me, seat.role_rank, pair.epoch)
        host = RoleWorkerHost(pair, seat.me, seat.rank, seat.leader, len(layout), out, placement, seat.role_rank,
                              watch)
        PairLoop(host, keep_bundles=job.keep_bundles, until_epoch=job.until_epoch,
                 outputs=RunOutputs(out) if seat.rank == 0 else None).run()
    finally:
        if watch is not None:
            watch.stop()  # a "done" beat: its peers no longer watch it


def _attach(job: WorkerJob, pair: PairState, seat: _Seat, watch: Watchdog | None):
    """Shard the role over its workers; attach the method to the adapter actor's proxy (when the
    roles run apart and talk)."""
    if not job.plan.co_located:
        role = pair.roles[seat.me]
        n = len(seat.ranks[seat.me])
        if n > 1:
            role.shard = (seat.role_rank, n)
            role.grad_sync = _grad_sync(seat.groups[seat.me], n)
    if not job.actor:
        return None, None
    actor = ray.get_actor(job.actor, namespace=job.namespace)
    group = seat.groups.get(seat.me) if len(seat.ranks[seat.me]) > 1 else None
    proxy = RayExchange(actor, seat.leader, group, seat.ranks[seat.me][0], sync=job.cfg.ray.mode == "sync",
                        watch=watch)
    pair.method.attach(proxy)
    if watch is not None:
        watch.actor = actor
    return proxy, actor


def _placement(out: Path, seat: _Seat, world: int, device) -> list:
    """Every worker's node, process and device (``placement.json``, written by world rank 0)."""
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"{seat.me}{seat.role_rank}.pid").write_text(str(os.getpid()))
    where = {"role": seat.me, "role_rank": seat.role_rank, "world_rank": seat.rank, "pid": os.getpid(),
             "node_id": ray.get_runtime_context().get_node_id(), "device": str(device),
             "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}
    placement = [None] * world
    if seat.distributed:
        dist.all_gather_object(placement, where)
    else:
        placement = [where]
    if seat.rank == 0:
        RunOutputs(out).placement(placement)
    return placement


def _restore(job: WorkerJob, pair: PairState, with_method: bool) -> dict | None:
    """This run's own latest bundle (after a restart), else the start bundle, else nothing."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and job.start_from:
        start = job.start_from  # a local/shared folder, or a Checkpoint in bucket storage
        ckpt = start if isinstance(start, Checkpoint) else Checkpoint.from_directory(start)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = load_bundle(Path(d) / BUNDLE)
    pair.load_state_dict(state, method=with_method)
    return state


def _begin_attempt(actor, proxy: RayExchange, pair: PairState, seat: _Seat, state: dict | None) -> None:
    """A new attempt: the actor drops whatever a killed attempt left (pending inputs, outputs,
    updates) and starts from the initial adapter state, then takes the checkpoint's."""
    box = [uuid.uuid4().hex if seat.rank == 0 else None]
    if seat.rank == 0:
        _begin(actor, box[0], proxy)
        if state is not None:
            proxy.attempt = box[0]
            pair.method.load_state_dict(state["method"])
    if seat.distributed:
        dist.broadcast_object_list(box, src=0)
    proxy.attempt = box[0]
