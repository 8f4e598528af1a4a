"""The pair's adapter actor and the worker-side proxy that talks to it.

The actor holds the exchange the method builds (MergeNet's adapters and their optimisers);
role leaders send it their factors as plain call arguments (inline when <= 100 KiB, else
through the object store) and get the generated matrices back. Every worker-group attempt
starts a fresh exchange under a new attempt id (:meth:`AdapterActor.begin`): nothing a killed
attempt left survives (docs/RELIABILITY.md)."""
from __future__ import annotations

import os
from contextlib import nullcontext

import ray
import torch
import torch.distributed as dist

from mergenet_core.training.loop import build_method
from orchestrator.config import PairConfig


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

    def __init__(self, cfg: PairConfig, spec: dict, steps_per_epoch: int):
        import threading

        self.cfg = cfg  # the driver's validated config, as an object
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
                 attempt: str = "", watch=None):
        self.actor, self.leader, self.group, self.leader_rank, self.sync = actor, leader, group, leader_rank, sync
        self.attempt = attempt
        self.watch = watch  # the worker's Watchdog: a blocking call past its deadline is a hang

    def waiting(self, what: str):
        return self.watch.waiting(what) if self.watch is not None else nullcontext()

    def _wait(self, what: str, ref):
        with self.waiting(what):
            return ray.get(ref)

    def put(self, step: int, mats: dict) -> None:
        if self.leader:
            keys = list(mats)
            # plain arguments: Ray inlines objects <= 100 KiB in the call message (a rank-r
            # factor usually is); an explicit ray.put first cost an object-store round trip
            self.actor.put.remote(self.attempt, step, keys, *[mats[k].detach().cpu().clone() for k in keys])

    def get(self, step: int, role: str):
        box = [None]
        if self.leader:
            box[0] = self._wait(f"get step {step}", self.actor.get.remote(self.attempt, step, role))
        if self.group is not None:
            dist.broadcast_object_list(box, src=self.leader_rank, group=self.group)
        return box[0]

    def feedback(self, gen_step: int, grads: dict, epoch: int) -> None:
        if self.leader:
            keys = list(grads)
            ref = self.actor.feedback.remote(self.attempt, gen_step, keys, epoch,
                                             *[grads[k].detach().cpu() for k in keys])
            if self.sync:
                self._wait(f"feedback step {gen_step}", ref)

    def take_epoch_metrics(self) -> dict:
        return self._wait("take_epoch_metrics", self.actor.take_epoch_metrics.remote(self.attempt))

    def state_dict(self) -> dict:
        return self._wait("state_dict", self.actor.state_dict.remote(self.attempt))

    def load_state_dict(self, state: dict) -> None:
        self._wait("load_state_dict", self.actor.load_state_dict.remote(self.attempt, state))
