"""Ctrl-C and SIGTERM that tell the truth (``mergenet run``, ``mergenet train``).

The first SIGINT or SIGTERM stops the work and lets it save what a resume needs: inside a Tune
grid it asks Tune to stop (Tune saves its experiment state, stops the trials and returns), and
the grid driver then marks every interrupted MLflow child run and the submission KILLED
(:func:`orchestrator.grid.tuner.run_grid`); anywhere else (sources, an engine run) it raises
:class:`Interrupted` at once, which the last bundle written already covers. The CLI prints one
closing line -- finished / total and the exact resume command -- and exits 130 (SIGINT) or 143
(SIGTERM). A second signal exits at once (after marking the open runs KILLED).

A trial process that writes its end state after that cannot undo KILLED: every run the driver
kills carries the tag ``mergenet.stopped_by = interrupt(SIGINT)``, which
:func:`orchestrator.tracking.end_run` honours, and a resume clears it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal. ``finished``/``total``: trials (or epochs) done;
    ``resume``: the command that continues it."""

    def __init__(self, signum: int, finished: int | None = None, total: int | None = None,
                 resume: str | None = None, what: str = "trials"):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.finished, self.total, self.resume, self.what = signum, finished, total, resume, what

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def closing_line(self) -> str:
        done = (f": {self.finished} of {self.total} {self.what} finished" if self.total is not None else "")
        return (f"interrupted ({signal.Signals(self.signum).name}){done}"
                + (f"; resume: {self.resume}" if self.resume else ""))


@dataclass
class _State:
    signum: int | None = None
    at: float | None = None  # time.time() of the first signal
    stop: Callable[[], None] | None = None  # asks the running work to stop (a Tune grid)
    on_second: list[Callable[[], None]] = field(default_factory=list)  # before exiting at once
    installed: bool = False


STATE = _State()


def signal_name(signum: int | None = None) -> str:
    return signal.Signals(signum or STATE.signum or signal.SIGINT).name


def install() -> None:
    """Handle SIGINT and SIGTERM in this (main) thread from now on. Call it again after
    ``ray.init``, which replaces the SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)
    STATE.installed = True


def uninstall() -> None:
    """The command has ended: a signal from now on (while Ray and MLflow shut down) exits at
    once, without a traceback from an exit hook."""
    if STATE.installed and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_now)
        STATE.installed = False


def _exit_now(signum: int, frame) -> None:
    os._exit(128 + signum)


def _handle(signum: int, frame) -> None:
    if STATE.signum is not None:  # the second signal: out now
        print(f"{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
        for fn in STATE.on_second:
            try:
                fn()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(128 + STATE.signum)
    STATE.signum, STATE.at = signum, time.time()
    if STATE.stop is not None:
        print(f"{signal.Signals(signum).name}: stopping the trials (their last checkpoints are kept); "
              "press Ctrl-C again to exit at once", file=sys.stderr, flush=True)
        STATE.stop()
        return
    raise Interrupted(signum)


def tune_stop() -> None:
    """Ask a running ``Tuner.fit()`` to stop: the handler Tune binds to SIGUSR1 for the run
    (``ray.tune.tune._setup_signal_catching``) sets its stop event; Tune then saves the
    experiment state, stops the trials and returns."""
    handler = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    if callable(handler):
        handler(signal.SIGUSR1, None)
