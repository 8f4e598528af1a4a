"""Hang detection for the split topology's Ray Train workers (docs/RELIABILITY.md, "Hung peers").

Ray Train's health check notices a *dead* worker; a peer that is stopped (``SIGSTOP``), frozen or
stuck without dying would hold the pair until some wait's timeout (the exchange's 600 s, the
process group's 30 min). So every worker of a pair with more than one worker (or with an adapter
actor) runs a :class:`Watchdog` thread that, every ``ray.hang.interval_s``:

- *beats*: writes a counter, its mean step time and its name under the run's key in the GCS
  key-value store (it works across nodes and does not depend on the adapter actor);
- reads the other workers' beats: a worker whose beat has not changed for longer than the
  deadline has stopped (a stopped process stops all its threads);
- pings the adapter actor, if the pair has one (a threaded actor answers while other calls wait
  in it): a ping unanswered for longer than the deadline means the actor is stuck;
- checks its own blocking adapter call (``get``, ``feedback``, ``begin``...): one that waited longer
  than the deadline means the peer it waits for or the actor makes no progress, even if both
  still beat.

The deadline is ``max(floor_s, step_multiple x the slowest worker's mean step time)`` (each
worker publishes its own), so slow pairs get proportionally more patience and a loaded machine
never trips it below the floor. A worker that finds a hang writes one line to its stderr and a
``hang`` event (``events.jsonl``); if the adapter actor is the one stuck it kills it (it restarts:
``max_restarts=-1``; the next attempt's first call waits for it); a silent peer on its own node it
``SIGKILL`` s; then it exits (:data:`HUNG_EXIT`). Ray Train sees a dead worker, exactly as after a
``SIGKILL``, and restarts the worker group from the last checkpoint; shutting the old group down
kills every old worker, so a stopped one on another node dies too (``ray.kill`` ends a stopped
process, after a 5 s wait for its answer and Ray's grace period of ~5 s). A worker that finishes
writes a final ``done`` beat, so its peers never take a finished worker for a hung one.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import ray

#: the exit status of a worker that found a hang (EX_TEMPFAIL: retrying may help)
HUNG_EXIT = 75
NAMESPACE = "mergenet-watch"


def key_prefix(run: str) -> str:
    """The GCS key-value prefix of one pair run's beats (the driver deletes it at the end)."""
    return f"hb/{run}/"


def deadline(floor_s: float, step_multiple: float, step_times) -> float:
    """How long a worker may go without progress: ``max(floor_s, step_multiple x slowest step)``."""
    return max(floor_s, step_multiple * max(step_times, default=0.0))


def mark(out: Path, what: str, role: str, role_rank: int, epoch: int, **extra) -> None:
    """Append one timestamped event line (``events.jsonl``; fault-recovery timing and tests)."""
    try:
        with (out / "events.jsonl").open("a") as f:
            f.write(json.dumps({"t": time.time(), "event": what, "worker": f"{role}{role_rank}",
                                "pid": os.getpid(), "epoch": epoch, **extra}) + "\n")
    except OSError:
        pass


class Ages:
    """When each peer's beat last changed (this process's monotonic clock: clocks of other
    nodes are never compared). A peer never seen counts from this watchdog's start."""

    def __init__(self, now: float):
        self.start = now
        self.seen: dict = {}

    def see(self, peer, value, now: float) -> None:
        old = self.seen.get(peer)
        if value is not None and (old is None or old[0] != value):
            self.seen[peer] = (value, now)

    def age(self, peer, now: float) -> float:
        old = self.seen.get(peer)
        return now - (old[1] if old else self.start)


class Watchdog:
    """One worker's hang detector (see the module docstring); ``spec``: the pair's
    :class:`~orchestrator.config.HangSpec`."""

    def __init__(self, spec, run: str, rank: int, world: int, role: str, role_rank: int, out: Path):
        self.spec, self.run, self.rank, self.world, self.out = spec, run, rank, world, out
        self.role, self.role_rank, self.name = role, role_rank, f"{role}{role_rank}"
        self.actor = None       # the adapter actor's handle, once known (set by the worker)
        self._steps: deque[float] = deque(maxlen=50)
        self._call: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._nonce = uuid.uuid4().hex[:8]
        self._beat = 0
        self._thread: threading.Thread | None = None
        self._node = ray.get_runtime_context().get_node_id()

    # ------------------------------------------------------------------ the worker's side
    def start(self) -> "Watchdog":
        self._put({"beat": 0})
        self._thread = threading.Thread(target=self._loop, name="mergenet-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The worker is done: no more checks, and a ``done`` beat so peers stop watching it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._put({"beat": self._beat + 1, "done": True})
        except Exception:  # noqa: BLE001 - best effort at the end
            pass

    def stepped(self, seconds: float) -> None:
        """One training step took ``seconds`` (the deadline's measure)."""
        self._steps.append(seconds)

    @contextmanager
    def waiting(self, what: str):
        """Around a blocking call to the adapter actor."""
        self._call = (what, time.monotonic())
        try:
            yield
        finally:
            self._call = None

    def step_s(self) -> float:
        return sum(self._steps) / len(self._steps) if self._steps else 0.0

    # ------------------------------------------------------------------ the thread
    def _key(self, rank: int) -> str:
        return key_prefix(self.run) + str(rank)

    def _put(self, extra: dict) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        value = {"worker": self.name, "pid": os.getpid(), "node": self._node, "nonce": self._nonce,
                 "step_s": self.step_s(), **extra}
        _internal_kv_put(self._key(self.rank), json.dumps(value), overwrite=True, namespace=NAMESPACE)

    def _peers(self) -> dict[int, dict]:
        from ray.experimental.internal_kv import _internal_kv_get

        out = {}
        for r in range(self.world):
            if r != self.rank:
                v = _internal_kv_get(self._key(r), namespace=NAMESPACE)
                if v:
                    out[r] = json.loads(v)
        return out

    def _loop(self) -> None:
        spec = self.spec
        ages = Ages(time.monotonic())
        ping: tuple | None = None  # (ref, sent at)
        while not self._stop.wait(spec.interval_s):
            try:
                self._beat += 1
                self._put({"beat": self._beat})
                peers = self._peers()
            except Exception:  # noqa: BLE001 - the GCS briefly unreachable: try again next beat
                continue
            now = time.monotonic()
            limit = deadline(spec.floor_s, spec.step_multiple,
                             [self.step_s(), *(p.get("step_s", 0.0) for p in peers.values())])
            for r in range(self.world):
                if r == self.rank:
                    continue
                p = peers.get(r)
                if p is not None and p.get("done"):
                    continue
                ages.see(r, (p["nonce"], p["beat"]) if p else None, now)
                if ages.age(r, now) > limit:
                    who = f"{p['worker']} (pid {p['pid']})" if p else f"world rank {r}"
                    self._hang(f"worker {who} sent no heartbeat for {ages.age(r, now):.1f} s", limit, peer=p)
            if self.actor is not None:  # a threaded actor answers while other calls wait in it
                if ping is None:
                    ping = (self.actor.pid.remote(), now)
                elif ray.wait([ping[0]], timeout=0)[0]:
                    ping = None  # answered (or failed: a dead actor is Ray's own fault path)
            ping_age = now - ping[1] if ping is not None else 0.0
            if ping_age > limit:
                self._hang(f"the adapter actor did not answer a ping for {ping_age:.1f} s", limit, actor_hung=True)
            # a call's wait counts only once every worker has measured a step: a peer's first step
            # (lazy init, autotuning, a big model on CPU) may take far longer than the ones after
            # it; until then the heartbeats and the actor ping still find a stopped process
            measured = self.step_s() > 0 and len(peers) == self.world - 1 and all(
                p.get("step_s", 0.0) > 0 or p.get("done") for p in peers.values())
            call = self._call
            if call is not None and measured and now - call[1] > limit:
                # the actor stuck too (a ping unanswered for most of the wait), or a peer behind it
                self._hang(f"its adapter call '{call[0]}' waited {now - call[1]:.1f} s", limit,
                           actor_hung=ping_age > limit / 2)

    def _hang(self, reason: str, limit: float, actor_hung: bool = False, peer: dict | None = None) -> None:
        line = (f"mergenet: hang: {reason} (deadline {limit:.1f} s, ray.hang)"
                + ("; restarting the adapter actor" if actor_hung else "")
                + f"; {self.name} exits so that Ray Train restarts the pair from its last checkpoint")
        print(line, file=sys.stderr, flush=True)
        mark(self.out, "hang", self.role, self.role_rank, -1, reason=reason)
        if actor_hung:
            # ray.kill ends a stopped process too (after Ray's ~5 s grace); the actor restarts
            # (max_restarts=-1) while Ray Train restarts the workers, whose first call waits for it
            try:
                ray.kill(self.actor, no_restart=False)
            except Exception:  # noqa: BLE001
                pass
        if peer is not None and peer.get("node") == self._node:
            # the stopped peer on this node: kill it now (as a SIGKILLed worker, Ray's tested path)
            # rather than leave it to the group's shutdown (a 5 s wait for its answer, then ray.kill)
            _kill_ray_worker(peer.get("pid"))
        os._exit(HUNG_EXIT)


def _kill_ray_worker(pid) -> None:
    """SIGKILL ``pid`` if it is a Ray worker process of this node (never a reused pid)."""
    try:
        if b"ray::" in Path(f"/proc/{int(pid)}/cmdline").read_bytes():
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, TypeError, ValueError):
        pass
