"""``mergenet run GRID.yaml``: the Ray Tune tuner of a grid (pairs x arms x seeds x search axes).

:func:`run_grid` owns the MLflow parent run (the submission), builds the tuner around the trial
driver (:func:`orchestrator.grid.trial.trial_fn`) with each trial's resources from its pair's
topology, and returns a summary. ``--resume DIR`` restores the Tune experiment: finished
trials are kept, unfinished ones restart from their last pair checkpoint and re-attach their
MLflow runs. Storage (``storage_path``, ``--resume``) is a local folder or a bucket URI
(:mod:`orchestrator.cluster.storage`, ``pyarrow.fs``).
"""
from __future__ import annotations

import json
import logging
import os
import time

from ray import tune

from mergenet_core.errors import MergenetError
from orchestrator import interrupts, tracking
from orchestrator.cluster.connect import ensure_ray
from orchestrator.grid.config import GridConfig
from orchestrator.tracking import view
from orchestrator.tracking.channel import MlflowEpochs
from orchestrator.grid.progress import GridProgress, quiet_console
from orchestrator.grid.spec import Submission, TrialSpec, axis, points, resolve_all
from orchestrator.grid.trial import trial_fn
from orchestrator.cluster.storage import Location

GRID_FILE = "mergenet_grid.json"
TRIALS_FILE = "mergenet_trials.json"  # every trial as resolved: key, pair, arm, seed, search values, topology
PARENT_FILE = "mlflow_parent_run_id"


def trial_resources(specs: dict[str, TrialSpec]):
    """Per trial: the placement-group bundles its spec holds (its pair's topology asked for them
    when the trial was resolved: :meth:`orchestrator.topology.Topology.resources`)."""
    from ray.tune import PlacementGroupFactory

    def resources(config: dict) -> PlacementGroupFactory:
        return PlacementGroupFactory([dict(b) for b in specs[config["trial"]["key"]].resources])

    return resources


def _scheduler(grid: GridConfig, epochs: int):
    s = grid.scheduler
    if s.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(metric=s.metric, mode=s.mode, time_attr="training_iteration", max_t=epochs,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        # one Tune report per segment of `perturbation_interval` epochs (see _pbt_segments)
        return PopulationBasedTraining(time_attr="training_iteration", metric=s.metric, mode=s.mode,
                                       perturbation_interval=1,
                                       hyperparam_mutations={"trial": {"hp": {
                                           k: axis(a, pbt=True) for k, a in s.hyperparam_mutations.items()}}})
    return None


def _trial_name(trial) -> str:
    import re

    return re.sub(r"[^\w.=-]", "-", trial.config["trial"]["key"])[:64] + "-" + trial.trial_id.split("_")[-1]


def build_tuner(sub: Submission, specs: dict[str, TrialSpec], storage: Location, restore: bool = False,
                verbose: bool = False) -> tune.Tuner:
    """``storage``: the folder holding the grid's folder (local, or a bucket URI). Ray gets a
    bucket as ``storage_path`` + ``storage_filesystem`` (the file system resolved from the URI,
    endpoint options included), so URI query parameters never have to survive Ray's path joins."""
    grid = sub.grid
    storage_path, storage_fs = storage.ray_storage()
    trainable = tune.with_resources(tune.with_parameters(trial_fn, sub=sub, specs=specs), trial_resources(specs))
    if restore:
        return tune.Tuner.restore(sub.folder.ray_storage()[0], trainable, resume_errored=True,
                                  storage_filesystem=storage_fs)
    first = next(iter(specs.values()))
    # one trial process serves trial after trial (no Python + torch start per trial) when every
    # trial asks for the same resources
    uniform = len({repr(s.resources) for s in specs.values()}) == 1
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([s.tune_config() for s in specs.values()])},
        tune_config=tune.TuneConfig(scheduler=_scheduler(grid, first.config.target.recipe.epochs),
                                    max_concurrent_trials=grid.max_concurrent_trials,
                                    reuse_actors=grid.scheduler.name != "pbt" and uniform,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=grid.grid, storage_path=storage_path, storage_filesystem=storage_fs,
                                  failure_config=tune.FailureConfig(max_failures=grid.max_failures),
                                  callbacks=[GridProgress(sub.uri, len(specs), str(sub.folder)),
                                             MlflowEpochs(sub.uri, str(sub.folder))],
                                  verbose=1 if verbose else 0),
    )


def run_grid(grid: GridConfig | None, address: str | None = None, resume_dir: str | None = None,
             verbose: bool = False) -> dict:
    """Submit (or resume) a grid; returns a summary with the MLflow ids and trial states."""
    uri = tracking.tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # reaches every worker through the runtime env
    if address or os.environ.get("RAY_ADDRESS"):  # an unreachable address fails before any run or folder exists
        from orchestrator.cluster.connect import CONNECT_TIMEOUT_S
        from orchestrator.cluster.secrets import probe_address

        probe_address(address or os.environ["RAY_ADDRESS"], CONNECT_TIMEOUT_S)
    grid, exp_dir = _grid_folder(grid, resume_dir)
    sub, link = _open_submission(grid, exp_dir, uri)
    c = tracking.client(uri)
    try:
        specs = _resolve(sub, bool(resume_dir))
        quiet_console(verbose=verbose, local_ray=not (address or os.environ.get("RAY_ADDRESS")))
        # the driver's Ray loggers at WARNING: no "Started a local Ray instance" / Tune INFO lines
        ensure_ray(address, **({} if verbose else {"logging_level": logging.WARNING}))
    except Exception as e:  # noqa: BLE001 - the submission's run ends FAILED with the reason
        tracking.end_run(c, sub.parent_run_id, ok=False, reason=f"{type(e).__name__}: {e}")
        raise
    results = _fit(c, sub, specs, exp_dir.parent, bool(resume_dir), verbose)
    errors = [r for r in results if r.error is not None]
    summary = {"experiment_id": sub.experiment_id, "parent_run_id": sub.parent_run_id, "storage": str(exp_dir),
               "trials": len(results), "failed": len(errors), "view": link}
    tracking.end_run(c, sub.parent_run_id, ok=not errors,
                     reason=f"{len(errors)} of {len(results)} trials failed" if errors else None)
    return summary


def _grid_folder(grid: GridConfig | None, resume_dir: str | None) -> tuple[GridConfig, Location]:
    """The grid and its folder: a resumed grid's own (its stored config), else a fresh folder
    (an earlier submission's folder is kept under a time-stamped name)."""
    if resume_dir:
        exp_dir = Location.parse(resume_dir)
        if not (exp_dir / GRID_FILE).exists():
            raise MergenetError(f"--resume: {exp_dir} is not a mergenet grid folder (no {GRID_FILE})")
        grid = GridConfig.model_validate_json((exp_dir / GRID_FILE).read_text())
        _check_trials(exp_dir, grid)
        return grid, exp_dir
    storage = Location.parse(grid.storage_path or "runs/grids")
    exp_dir = storage / grid.grid
    if (exp_dir / GRID_FILE).exists():
        exp_dir.move_to(storage / f"{grid.grid}.{time.strftime('%Y%m%d-%H%M%S')}")  # keep the old submission's files
    return grid, exp_dir


def _resolve(sub: Submission, resumed: bool) -> dict[str, TrialSpec]:
    """Every trial resolved once, here, and recorded in the grid's folder; a resumed grid's
    trials must resolve to the keys Tune's state holds."""
    specs = resolve_all(sub.grid, sub)
    f = sub.folder / TRIALS_FILE
    if resumed and [r["key"] for r in json.loads(f.read_text())] != list(specs):
        raise MergenetError(f"--resume: the trials of {sub.folder} resolve to other keys with this mergenet than "
                            "when it started; run the grid again")
    rows = [{"key": t.key, "pair": t.pair, "arm": t.arm, "seed": t.seed, "hp": t.hp, "topology": t.topology}
            for t in specs.values()]
    f.write_text(json.dumps(rows, indent=1, default=str))
    return specs


def _check_trials(exp_dir: Location, grid: GridConfig) -> None:
    """A resumed grid finds its trials by key: they must resolve here as they did when it started."""
    f = exp_dir / TRIALS_FILE
    if not f.exists():
        raise MergenetError(f"{exp_dir} was started by an older mergenet (no {TRIALS_FILE}: its trials were not "
                            "resolved once); run the grid afresh (a search: `mergenet run GRID.yaml --reselect`)")
    stored = [(r["pair"], r["arm"], r["seed"], r["hp"]) for r in json.loads(f.read_text())]
    here = [(p, a, s, json.loads(json.dumps(hp, default=str))) for p, a, s, hp in points(grid)]
    if stored != here:
        raise MergenetError(f"the trials of {exp_dir} resolve differently with this mergenet ({len(here)} here, "
                            f"{len(stored)} when it started); run the grid afresh (a search: `--reselect`)")


def _open_submission(grid: GridConfig, exp_dir: Location, uri: str) -> tuple[Submission, str]:
    """The MLflow experiment and parent run (re-attached on a resume), the grid's stored config,
    the saved MLflow view; prints where everything is."""
    c = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(c, grid.grid)
    exp_dir.mkdir()
    (exp_dir / GRID_FILE).write_text(grid.model_dump_json(indent=2))
    parent = tracking.attach_or_create(
        c, exp_dir, experiment_id, f"{grid.grid}-{time.strftime('%Y%m%d-%H%M%S')}",
        {"mergenet.grid": grid.grid, "mergenet.git_sha": tracking.git_sha(), "mergenet.kind": "submission"})
    (exp_dir / PARENT_FILE).write_text(parent)
    tracking.log_params(c, parent, tracking.flatten(grid.model_dump(mode="json")))
    key = view.write_view(c, experiment_id, grid.grid, parent, baseline=grid.report.baseline,
                          several_pairs=len(grid.pairs) > 1)  # the link below opens on the answer
    link = view.view_url(uri, experiment_id, key)
    print(f"grid {grid.grid}: {grid.trial_count()} trials; MLflow {uri} experiment {experiment_id} "
          f"run {parent}; storage {exp_dir}\nMLflow view (trials by arm): {link}", flush=True)
    return Submission(grid, exp_dir, parent, experiment_id, uri, tracking.git_sha()), link


def _fit(c, sub: Submission, specs: dict[str, TrialSpec], storage: Location, restore: bool, verbose: bool):
    """Tune's run of the trials. Ctrl-C / SIGTERM: Tune stops (its own SIGINT handler off: ours asks
    it to stop and records the signal), then every interrupted run is marked KILLED here
    (orchestrator/interrupts.py)."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    interrupts.install()  # after ray.init, which binds SIGTERM to sys.exit
    stop_before, interrupts.STATE.stop = interrupts.STATE.stop, interrupts.tune_stop
    kill_now = lambda: _kill_interrupted(c, sub.experiment_id, sub.parent_run_id)  # noqa: E731 - a second Ctrl-C
    interrupts.STATE.on_second.append(kill_now)
    _quiet_tune_interrupt_lines()
    try:
        results = build_tuner(sub, specs, storage, restore=restore, verbose=verbose).fit()
    except BaseException as e:
        if interrupts.STATE.signum is None:
            tracking.end_run(c, sub.parent_run_id, ok=False, reason=f"{type(e).__name__}: {e}")
            raise
        results = None  # interrupted before Tune could take the signal
    finally:
        interrupts.STATE.stop = stop_before
        interrupts.STATE.on_second.remove(kill_now)
    if interrupts.STATE.signum is not None:
        _kill_interrupted(c, sub.experiment_id, sub.parent_run_id)
        runs = tracking.children(c, sub.experiment_id, sub.parent_run_id)
        raise interrupts.Interrupted(interrupts.STATE.signum,
                                     finished=sum(r.info.status == "FINISHED" for r in runs),
                                     total=len(specs), resume=f"mergenet run --resume {sub.folder}")
    return results


def _kill_interrupted(c, experiment_id: str, parent: str) -> int:
    """Mark KILLED every trial run the interrupt left open (RUNNING, or FAILED since the signal:
    a trial process stopped by it), and the submission; returns how many trials."""
    name, since = interrupts.signal_name(), (interrupts.STATE.at or 0) * 1000
    n = 0
    for r in tracking.children(c, experiment_id, parent):
        if r.info.status == "RUNNING" or (r.info.status == "FAILED" and (r.info.end_time or 0) >= since):
            tracking.kill_run(c, r.info.run_id, name)
            n += 1
    tracking.kill_run(c, parent, name, what=f"the grid was interrupted ({n} trials stopped)")
    return n


class _NoTuneResumeHint(logging.Filter):
    """Tune's own lines on an interrupt name ``Tuner.restore``; ``mergenet run --resume`` is ours."""

    DROP = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(str(record.msg).startswith(d) for d in self.DROP)


def _quiet_tune_interrupt_lines() -> None:
    log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTuneResumeHint) for f in log.filters):
        log.addFilter(_NoTuneResumeHint())
