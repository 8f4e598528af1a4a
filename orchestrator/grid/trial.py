"""The Tune trial driver of ``mergenet run``: one pair, one MLflow child run.

Train V2 pattern: every trial is a Tune *function* that runs its pair through the pair's
topology (its resolved spec names it): in this process (``inline``) or as a Ray Train worker group
it drives (``split``); each epoch's record reaches Tune, whose results the driver's callbacks read
(ASHA, the progress lines, and the MLflow logging of :mod:`orchestrator.tracking.channel`). With
PBT the pair trains segment by segment (:func:`orchestrator.topology.pbt.run_pbt`). The driver knows no topology by name.

Storage: a trial's folder (``trials/<id>``) holds its MLflow run id, the pair's outputs
(``pair/``: :data:`mergenet_core.io.PAIR_OUTPUTS`) and its Train run. With a bucket the pair's
outputs go to a local scratch folder first and are uploaded when the pair ends.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ray import tune

from mergenet_core.io import CONFIG, CURVE, FINAL, METRICS, PAIR_OUTPUTS, PLACEMENT
from mergenet_core.io.outputs import RunOutputs, summarise
from mergenet_core.plugins import load_plugins
from orchestrator import topology, tracking
from orchestrator.tracking import figures
from orchestrator.grid.spec import Submission, TrialSpec, for_trial
from orchestrator.tracking.channel import REPLAYED, log_missing_epochs
from orchestrator.cluster.storage import Location, scratch_dir
from orchestrator.topology.pbt import run_pbt


def trial_folder(grid_dir: str | Path | Location, trial_id: str) -> Location:
    """A trial's own folder in the grid's storage (shared storage or a bucket on clusters): its
    MLflow run id, the pair's outputs and the pair's Ray Train run (so a restored trial resumes it)."""
    grid = grid_dir if isinstance(grid_dir, Location) else Location.parse(grid_dir)
    return grid / "trials" / trial_id


def _quiet_sigterm_exit(unraisable) -> None:
    """Ray's SIGTERM handler raises SystemExit; when Ray stops a reused, idle trial process at
    the end of a grid that can land inside a garbage-collection callback, and Python then
    prints an "Exception ignored" traceback for an ordinary shutdown. Everything else is
    reported as usual."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def trial_fn(config: dict, sub: Submission, specs: dict[str, TrialSpec]) -> None:
    """Tune trial driver: one pair, one MLflow child run, from the trial's resolved spec."""
    sys.unraisablehook = _quiet_sigterm_exit
    spec = for_trial(specs, config["trial"], sub)  # a PBT-mutated trial's parse imports its plugins
    load_plugins(spec.plugins)
    trial_id = tune.get_context().get_trial_id()
    trial_dir = trial_folder(sub.folder, trial_id)
    # pair outputs: straight into the trial folder when it is local, else a local scratch
    # folder uploaded to the bucket at the end (the Train run and its checkpoints go to the
    # bucket directly)
    work = trial_dir.local or scratch_dir(sub.grid.grid, trial_id)
    c = tracking.client(sub.uri)
    run_id = tracking.attach_or_create(c, trial_dir, sub.experiment_id, spec.run_name,
                                       {**spec.tags, "mergenet.trial_id": trial_id}, reopen_finished=False)
    run = c.get_run(run_id)
    if run.info.status == "FINISHED":  # finished before an interruption Tune's state did not record
        tune.report({**run.data.metrics, REPLAYED: 1})  # Tune's record only: MLflow holds it already
        return
    try:
        tracking.log_params(c, run_id, spec.params)
        final = _run_pair(sub, spec, trial_dir, work / "pair", work)
        _finish(c, run_id, sub, spec, trial_dir, work / "pair", final)
    except BaseException as e:
        if not tune_ended(e):  # a stop or a pause: the driver records which (end_stopped)
            tracking.end_run(c, run_id, ok=False, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        if trial_dir.local is None:
            shutil.rmtree(work, ignore_errors=True)  # the private scratch folder (tempfile.mkdtemp)


def _run_pair(sub: Submission, spec: TrialSpec, trial_dir: Location, out: Path, work: Path) -> dict:
    """The pair through its topology, each epoch reported to Tune: whole, or PBT segment by segment."""
    topo = topology.get(spec.topology)
    grid = sub.grid
    if grid.scheduler.name == "pbt":
        return run_pbt(topo, spec.config, store=trial_dir, work=work, out=out,
                       interval=grid.scheduler.perturbation_interval, keep_bundles=grid.bundles_while_running,
                       plan=spec.plan)
    return topo.run(spec.config, topology.RunRequest(out, trial_dir, keep_bundles=grid.bundles_while_running,
                                                     report=True, plan=spec.plan))


def _finish(c, run_id: str, sub: Submission, spec: TrialSpec, trial_dir: Location, out: Path, final: dict) -> None:
    """Where each worker ran, the bundles kept or dropped, the learning curve, the outputs
    uploaded and logged, the run FINISHED."""
    placement = json.loads((out / PLACEMENT).read_text()) if (out / PLACEMENT).exists() else []
    for w in placement:
        c.set_tag(run_id, f"mergenet.node.{w['role']}{w['role_rank']}", w["node_id"])
    if sub.grid.keep_bundles == "none":
        topology.get(spec.topology).drop_bundles(out, trial_dir)
        RunOutputs(out).no_bundles()
    figures.learning_curve_png(RunOutputs(out).read_history(), out / "learning_curve.png", title=spec.config.name)
    (trial_dir / "pair").upload(out, list(PAIR_OUTPUTS))  # nothing to do when the folder is local
    log_outputs(c, run_id, out, final)
    tracking.end_run(c, run_id, ok=True)


def tune_ended(e: BaseException) -> bool:
    """Tune ends a function trial that a scheduler stops (ASHA) or pauses (PBT) with
    ``SystemExit(0)`` at the trial's next report. That is no failure, and only the driver knows
    which it was (a stopped trial completes there: :func:`end_stopped`; a paused one resumes)."""
    return isinstance(e, SystemExit) and e.code in (0, None)


def log_outputs(c, run_id: str, out: Path, final: dict) -> None:
    """The pair's summary on its run (at step 0: MLflow draws a metric logged once as a bar, not
    a dot on a line) and its output files that exist."""
    tracking.log_metrics(c, run_id, final, step=0)
    for name in (CONFIG, FINAL, METRICS, CURVE):
        if (out / name).exists():
            c.log_artifact(run_id, str(out / name))


def end_stopped(c, run_id: str, folder: Location) -> None:
    """End the run of a trial that Tune stopped before its function returned: a scheduler's
    decision (ASHA stops a trial at a rung, and every trial at the recipe's last epoch), a normal
    end. The run ends FINISHED with the summary of the epochs the trial ran (``final.json``
    written, the outputs logged, the epochs the trial had no time to log added); when the trial
    stopped before the recipe's last epoch -- or its outputs cannot be read here (a bucket's
    trial uploads them at its end) -- it is tagged ``mergenet.stopped_by = scheduler`` and
    ``mergenet.stopped_at_epoch``. The report compares such trials at a common epoch
    (:func:`orchestrator.tracking.records.at_common_epoch`)."""
    out = (folder / "pair").local
    history = RunOutputs(out).read_history() if out is not None else []
    last = history[-1]["epoch"] if history else None
    if history:
        log_missing_epochs(c, run_id, history)
        log_outputs(c, run_id, out, RunOutputs(out).finish(summarise(history)))
    config = out / CONFIG if history else None
    budget = json.loads(config.read_text())["target"]["recipe"]["epochs"] if config and config.exists() else None
    if last is None or budget is None or last < budget:
        c.set_tag(run_id, tracking.STOPPED_BY, "scheduler")
        if last is not None:
            c.set_tag(run_id, tracking.STOPPED_AT, str(last))
    tracking.end_run(c, run_id, ok=True)
