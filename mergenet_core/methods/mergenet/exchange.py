"""The put / get / feedback protocol around one :class:`AdapterHub`.

Per transfer step ``k`` every role runs three phases (see ``method.py``):

1. ``put``: send the matrices it contributes (providers: ``A_s``; receivers: ``A_t``);
2. ``get``: receive the generated ``A'_t`` for each link it receives, write it in place;
3. after its own optimiser step, ``feedback``: the tensor the update rule needs
   (``delta``: ``A'_t - A_t^after``; ``exact``: ``dL_t/dA'_t``), and the hub updates the adapter.

:class:`Exchange` implements the protocol in-process around an :class:`AdapterHub`; a host that
runs the roles in separate processes (the Ray pair's adapter actor) wraps the very same class,
so every host runs identical code. ``get`` blocks until every ``put`` of that step has arrived,
which is what lets two processes call it concurrently.
"""
from __future__ import annotations

import threading
from collections import deque

from torch import Tensor

from .hub import AdapterHub


class Exchange:
    """The put / get / feedback protocol around one :class:`AdapterHub` (thread-safe).

    ``put`` stores a role's matrices for a step; once a step's inputs are complete the
    adapter generates that step's outputs. ``get`` returns, for the links a role receives,
    the newest generated output that role has not used yet whose step is at least
    ``step - staleness_steps``, waiting for one if needed. Older unused outputs are dropped.
    ``feedback`` is keyed by the step the output was generated at.

    ``staleness_steps = 0`` (sync): the put that completes the inputs generates inline and
    ``feedback`` updates inline, so ``get`` returns exactly the output for ``step`` and every
    update lands before the next generation -- the single-process engine's semantics.

    ``staleness_steps = k * t_cycle`` (async): generation and updates run in order on a
    background thread of the exchange; ``put`` and ``feedback`` only enqueue. A receiver's
    ``get`` takes the newest unused output at most ``k`` transfers old if there is one; if
    there is none but the output it wrote last is itself at most ``k`` transfers old, it
    returns no output (the role trains on without a write this step) instead of waiting; it
    waits only when the adapter has fallen more than ``k`` transfers behind. In steady state
    the receiver therefore writes, at each transfer, the output generated from the previous
    transfer's factors while it trained, and never waits. Each output is generated from a detached copy
    of the adapter's parameters (``AdapterHub.generate(snapshot=True)``), so its update may
    follow other updates. Results then depend on timing and are not bit-reproducible.
    """

    def __init__(self, hub: AdapterHub, staleness_steps: int = 0, timeout_s: float = 600.0):
        self.hub = hub
        self.links = list(hub.links.values())
        self.receivers = {l.receiver for l in self.links}
        self.staleness_steps = staleness_steps
        self.timeout_s = timeout_s
        self._cv = threading.Condition()
        self._inbox: dict[int, dict[tuple[str, str], Tensor]] = {}
        self._ready: dict[int, dict[str, Tensor | None]] = {}
        self._taken: dict[int, set[str]] = {}
        self._error: BaseException | None = None
        self._expected = {(l.id, side) for l in self.links for side in ("x", "y")}
        self.background = staleness_steps > 0
        self._jobs: deque[tuple] = deque()
        self._busy = False
        self._last_used: dict[str, int] = {}
        if self.background:
            threading.Thread(target=self._work, name="mergenet-adapter", daemon=True).start()

    # ------------------------------------------------------------------ protocol
    def put(self, step: int, mats: dict[tuple[str, str], Tensor]) -> None:
        with self._cv:
            self._raise_error()
            box = self._inbox.setdefault(step, {})
            box.update(mats)
            if not self._expected <= box.keys():
                return
            del self._inbox[step]
            # (A_t, A_s, and the receiver's scale metric B^T B where its layer has a B factor)
            inputs = {l.id: (box[(l.id, "x")], box[(l.id, "y")], box.get((l.id, "g"))) for l in self.links}
            if self.background:
                self._jobs.append(("generate", step, inputs))
                self._cv.notify_all()
                return
            try:
                self._publish(step, self.hub.generate(step, inputs))
            except BaseException as e:  # noqa: BLE001 - surfaced to every waiting role
                self._error = e
                raise
            finally:
                self._cv.notify_all()

    def get(self, step: int, role: str) -> tuple[int, dict[str, Tensor | None]]:
        """``(generation step, {link id: new matrix or None})`` for the links ``role`` receives."""
        floor = step - self.staleness_steps

        def fresh() -> list[int]:
            return [s for s in self._ready if s >= floor and role not in self._taken[s]]

        with self._cv:
            self._raise_error()
            if self.background and not fresh() and self._last_used.get(role, floor - 1) >= floor:
                return self._last_used[role], {}  # nothing new yet, and the last one is recent enough
            ok = self._cv.wait_for(lambda: self._error is not None or fresh(), self.timeout_s)
            self._raise_error()
            if not ok:
                raise TimeoutError(f"exchange: no adapter output for step >= {floor} within {self.timeout_s}s")
            use = max(fresh())
            self._last_used[role] = use
            out = {l.id: self._ready[use][l.id] for l in self.links if l.receiver == role}
            for s in [s for s in self._ready if s <= use and role not in self._taken[s]]:
                self._taken[s].add(role)
                if s != use:  # an older output this role skips: free its graph
                    for lid in out:
                        self.hub.pending.pop((s, lid), None)
            for s in [s for s in self._ready if self._taken[s] >= self.receivers]:
                del self._ready[s], self._taken[s]
            return use, out

    def feedback(self, gen_step: int, grads: dict[str, Tensor], epoch: int) -> None:
        with self._cv:
            self._raise_error()
            if self.background:
                self._jobs.append(("update", gen_step, grads, epoch))
                self._cv.notify_all()
            else:
                self.hub.update(gen_step, grads, epoch)

    # ------------------------------------------------------------------ internals
    def _publish(self, step: int, out: dict[str, Tensor | None]) -> None:
        self._ready[step] = out
        self._taken[step] = set()

    def abandon(self, error: BaseException) -> None:
        """Fail every call waiting here (and every later one) with ``error``: a superseded
        exchange frees its waiting callers at once instead of after ``timeout_s``."""
        with self._cv:
            self._error = error
            self._cv.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        """Background thread (async): run the queued generations and updates in order."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._jobs))
                job = self._jobs.popleft()
                self._busy = True
            try:
                if job[0] == "generate":
                    out = self.hub.generate(job[1], job[2], snapshot=True)
                    with self._cv:
                        self._publish(job[1], out)
                else:
                    self.hub.update(job[1], job[2], job[3])
            except BaseException as e:  # noqa: BLE001 - surfaced to the roles' next call
                with self._cv:
                    self._error = e
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _idle(self) -> None:
        """Wait (holding the lock) until the background thread has nothing left to do."""
        if self.background and not self._cv.wait_for(lambda: not self._jobs and not self._busy, self.timeout_s):
            raise TimeoutError(f"exchange: adapter still busy after {self.timeout_s}s")
        self._raise_error()

    # hub passthroughs (also the Ray actor's API); they see every queued update applied
    def take_epoch_metrics(self) -> dict[str, float]:
        with self._cv:
            self._idle()
            return self.hub.take_epoch_metrics()

    def state_dict(self) -> dict:
        with self._cv:
            self._idle()
            return self.hub.state_dict()

    def load_state_dict(self, state: dict) -> None:
        with self._cv:
            self._error = None
            self._idle()
            self.hub.load_state_dict(state)
            self._inbox.clear()
            self._ready.clear()
            self._taken.clear()
            self._jobs.clear()
            self._last_used.clear()
            self._error = None
