"""What ``mergenet run`` shows and guarantees while a grid runs: one console line per trial state
change and a progress line (:class:`GridProgress`, a Tune callback that also ends every MLflow
child run FINISHED or FAILED with the reason, even when a scheduler stops a trial -- a normal
end, FINISHED -- or a trial process dies), and the console settings that keep Ray's own output
to warnings (:func:`quiet_console`)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ray import tune

from orchestrator import interrupts, tracking
from orchestrator.grid.trial import end_stopped, trial_folder


class GridProgress(tune.Callback):
    """One line per trial state change, and MLflow end states the trial could not write."""

    def __init__(self, uri: str, total: int, grid_dir: str, every_s: float = 30.0):
        self.uri, self.total, self.grid_dir, self.every_s = uri, total, grid_dir, every_s  # a path or a URI
        self.setup()

    def setup(self, *args, **info):
        """The clock and the counts start with this process: ``Tuner.restore`` unpickles the
        callback of the interrupted run, whose clock started then and whose count missed the
        trials that had finished (the counts are taken from the trials on the first event)."""
        self.started = self.last_progress = time.time()
        self.done = self.done_before = None

    def _count(self, trials) -> None:
        if self.done is None:
            self.done = self.done_before = sum(t.status in ("TERMINATED", "ERROR") for t in trials)

    def on_step_begin(self, iteration, trials, **info):
        """A signal that came before Tune could take it (while the tuner was built) stops the run now."""
        if interrupts.STATE.signum is not None:
            interrupts.tune_stop()

    def on_step_end(self, iteration, trials, **info):
        """Every ``every_s`` seconds one progress line: done / running / pending, elapsed, ETA
        (from the pace of this process: a resumed grid does not count the trials it found done)."""
        self._count(trials)
        now = time.time()
        if now - self.last_progress < self.every_s:
            return
        self.last_progress = now
        states = [t.status for t in trials]
        done = sum(s in ("TERMINATED", "ERROR") for s in states)
        running = states.count("RUNNING")
        pending = max(0, self.total - done - running)
        elapsed, here = now - self.started, done - self.done_before
        eta = f"{_mmss(elapsed / here * (self.total - done))}" if here > 0 else "?"
        print(f"[{time.strftime('%H:%M:%S')}] progress   {done}/{self.total} done, {running} running, "
              f"{pending} pending; elapsed {_mmss(elapsed)}, ETA {eta}", flush=True)

    def _line(self, trial, state: str, extra: str = "") -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {state:<10} {trial.trial_id} {_short(trial.config)}"
              f"{'  ' + extra if extra else ''}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._count(trials)
        self._line(trial, "RUNNING")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._line(trial, "RETRYING")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count(trials)
        self.done += 1
        r = trial.last_result or {}
        acc = r.get("target/val_acc")
        self._line(trial, "FINISHED", f"target val_acc={acc:.4f}  ({self.done}/{self.total})" if acc is not None
                   else f"({self.done}/{self.total})")
        self._close(trial, ok=True, reason=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._count(trials)
        self.done += 1
        reason = _error_text(trial)
        self._line(trial, "ERROR", reason.splitlines()[-1][:200] if reason else "")
        self._close(trial, ok=False, reason=reason or "trial failed")

    def _close(self, trial, ok: bool, reason: str | None) -> None:
        """The end of a run its trial left open: FAILED with the reason, or -- a trial Tune
        stopped for its scheduler -- FINISHED (:func:`end_stopped`). A stop for an interrupt is
        left to :func:`orchestrator.grid.tuner.run_grid`, which marks the run KILLED."""
        folder = trial_folder(self.grid_dir, trial.trial_id)  # Location: local or bucket
        f = folder / tracking.RUN_ID_FILE
        if not f.exists():
            return
        c = tracking.client(self.uri)
        run_id = f.read_text().strip()
        if c.get_run(run_id).info.status != "RUNNING":
            return
        if not ok:
            tracking.end_run(c, run_id, ok=False, reason=reason)
        elif interrupts.STATE.signum is None:
            end_stopped(c, run_id, folder)


def _mmss(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _short(config: dict) -> str:
    """The trial's key (:class:`orchestrator.grid.spec.TrialSpec`): pair, arm, seed, search values."""
    return str((config.get("trial") or {}).get("key", "?"))


def _error_text(trial) -> str:
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and Path(path).exists() and attr == "error_file":
            return Path(path).read_text()[-4000:]
    return str(getattr(trial, "error_msg", "") or "")


def quiet_console(verbose: bool = False, local_ray: bool = True) -> None:
    """The console of ``mergenet run``: our own lines (one per trial state change, the progress
    line, the report) and Ray's warnings and errors, nothing else. Each setting is a default
    (``setdefault``: an explicit environment wins); Ray workers inherit the environment.

    - ``RAY_AIR_NEW_OUTPUT=0`` (unless ``--verbose``): Tune's legacy output engine, which at
      ``verbose=0`` is silent; the new engine prints its experiment banner, "View detailed
      results here" and the TensorBoard hint whatever the verbosity.
    - ``MLFLOW_LOGGING_LEVEL=WARNING`` (also set by the CLI before MLflow is imported): no INFO
      lines when the sqlite store creates or migrates its tables.
    - ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` for a local Ray (no spot instances to watch).
    - ``ray.init(logging_level=WARNING)`` (in :func:`run_grid`): no "Started a local Ray
      instance" or "Wrote the latest version of all result files" INFO lines.

    ``RAY_AUTH_MODE=token`` (the mode a new local Ray picks by default, chosen explicitly so Ray
    does not warn that it picked it) must be set before Ray is imported: the CLI does that
    (:func:`orchestrator.cli.main`)."""
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if local_ray:
        # Ray Train's preemption watcher (an actor per split pair's Train run) watches for cloud
        # spot-instance preemption, which a local Ray never sees; starting it logs a core-worker
        # error line per run ("PreemptionWatcher ... has constructor arguments in the object store")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


