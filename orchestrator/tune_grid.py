"""``mergenet run GRID.yaml``: a Ray Tune grid whose trials each drive one pair's TorchTrainer.

Train V2 pattern: every trial is a Tune *function* (the trial driver) that builds the pair's
``TorchTrainer`` (``orchestrator.pair``) and calls ``fit()``; Train's ``TuneReportCallback``
forwards rank 0's per-epoch metrics to Tune (for ASHA and the progress table) and
:class:`~orchestrator.tracking.MlflowEpochLogger` writes them to the trial's MLflow child run.

The driver owns the MLflow parent run and a Tune callback that guarantees every child run
ends FINISHED or FAILED (with the reason), even when a scheduler stops a trial or a trial
process dies. ``--resume DIR`` restores the Tune experiment: finished trials are kept,
unfinished ones restart from their last pair checkpoint and re-attach their MLflow runs.

Storage (``storage_path``, ``--resume``) is a local folder or a bucket URI
(:mod:`orchestrator.storage`, ``pyarrow.fs``). With a bucket, Tune's experiment state, each
trial's record (``trials/<id>/mlflow_run_id``), its Ray Train run (checkpoints) and the pair's
outputs (``trials/<id>/pair``: ``final.json``, ``metrics.jsonl``, ``placement.json``, ...) are
all in the bucket; a trial writes its pair outputs to a local scratch folder first and uploads
them when the pair ends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mergenet_core.errors import MergenetError
from mergenet_core.loop import BEST, CHECKPOINT, load_bundle, numeric
from mergenet_core.config import deep_merge
from orchestrator import tracking
from orchestrator.grid import GridConfig
from orchestrator.inline import choose_topology, run_pair_inline
from orchestrator.cluster.connect import ensure_ray
from orchestrator.cluster.worker import BUNDLES, PLACEMENT
from orchestrator.pair import run_pair_on_ray
from orchestrator.storage import Location, scratch_dir

GRID_FILE = "mergenet_grid.json"
PARENT_FILE = "mlflow_parent_run_id"


# --------------------------------------------------------------------------- trial


#: the pair outputs a trial keeps in its storage folder (``trials/<id>/pair``)
PAIR_OUTPUTS = ("config.json", "final.json", "metrics.jsonl", PLACEMENT, "learning_curve.png", BUNDLES)


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


def trial_fn(config: dict, grid_json: str, parent_run_id: str, experiment_id: str, uri: str, sha: str,
             grid_dir: str) -> None:
    """Tune trial driver: one pair, one MLflow child run."""
    sys.unraisablehook = _quiet_sigterm_exit
    grid = GridConfig.model_validate_json(grid_json)
    ctx = tune.get_context()
    trial_dir = trial_folder(grid_dir, ctx.get_trial_id())
    # pair outputs: straight into the trial folder when it is local, else a local scratch
    # folder uploaded to the bucket at the end (the Train run and its checkpoints go to the
    # bucket directly)
    work = trial_dir.local or scratch_dir(grid.grid, ctx.get_trial_id())
    # config["method"]: the arm (a key of the grid's methods), which may run another method
    pair, arm, seed, hp = config["pair"], config["method"], config["seed"], dict(config.get("hp") or {})
    cfg = grid.trial_config(pair, arm, seed, hp)
    c = tracking.client(uri)
    tags = {"mlflow.parentRunId": parent_run_id, tracking.TRIAL_TAG: "1", "mergenet.grid": grid.grid,
            "mergenet.pair": pair, "mergenet.arm": arm, "mergenet.method": grid.method_of(arm),
            "mergenet.seed": str(seed), "mergenet.trial_id": ctx.get_trial_id(), "mergenet.git_sha": sha,
            **pair_labels(grid, pair)}
    params = tracking.flatten(cfg.model_dump(mode="json"))
    short = short_params(grid, pair, arm, hp, params)
    run_id = tracking.attach_or_create(c, trial_dir, experiment_id, run_name(arm, seed, pair, short), tags)
    run = c.get_run(run_id)
    if run.info.status == "FINISHED":  # finished before an interruption Tune's state did not record
        tune.report(dict(run.data.metrics))
        return
    try:
        params.update({f"hp.{k}": str(v) for k, v in hp.items()})
        params.update(short)
        tracking.log_params(c, run_id, params)
        out = work / "pair"
        keep = grid.bundles_while_running
        topology = choose_topology(cfg)
        c.set_tag(run_id, "mergenet.topology", topology)
        if topology == "inline" and grid.scheduler.name == "pbt":
            final = _pbt_inline(grid, cfg, trial_dir, work, out, uri, run_id)
        elif topology == "inline":
            pending: list[dict] = []

            def on_epoch(record: dict) -> None:  # this process is the whole pair: report directly
                numbers = numeric(record)
                pending.append(numbers)
                tune.report(numbers)

            def on_saved(record: dict) -> None:
                # to MLflow once the epoch's bundle is saved: a trial killed between an epoch's end
                # and its bundle resumes from the bundle before and runs that epoch again, which would
                # otherwise log its metrics twice
                for numbers in pending:
                    tracking.log_metrics(c, run_id, numbers, step=int(numbers["epoch"]))
                pending.clear()

            final = run_pair_inline(cfg, out, on_epoch=on_epoch, on_saved=on_saved, keep_bundles=keep,
                                    remote=None if trial_dir.local is not None else trial_dir / "inline")
            on_saved({})  # epochs after the last bundle (none: the last epoch always saves one)
        elif grid.scheduler.name == "pbt":
            final = _pbt_segments(grid, cfg, trial_dir, work, out, tracking.MlflowEpochLogger(uri, run_id))
        else:
            storage_path, storage_fs = trial_dir.ray_storage()
            final = run_pair_on_ray(cfg, out, resume=True, storage_path=storage_path, storage_filesystem=storage_fs,
                                    name="train", keep_bundles=keep,
                                    callbacks=[TuneReportCallback(), tracking.MlflowEpochLogger(uri, run_id)])
        tracking.log_metrics(c, run_id, final, step=int(final.get("epochs", 0)))
        placement = json.loads((out / PLACEMENT).read_text()) if (out / PLACEMENT).exists() else []
        for w in placement:
            c.set_tag(run_id, f"mergenet.node.{w['role']}{w['role_rank']}", w["node_id"])
        if grid.keep_bundles == "none":
            drop_bundles(out, trial_dir, topology)
        history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
        tracking.learning_curve_png(history, out / "learning_curve.png", title=cfg.name)
        (trial_dir / "pair").upload(out, list(PAIR_OUTPUTS))  # nothing to do when the folder is local
        for name in ("config.json", "final.json", "metrics.jsonl", "learning_curve.png"):
            c.log_artifact(run_id, str(out / name))
        tracking.end_run(c, run_id, ok=True)
    except BaseException as e:
        tracking.end_run(c, run_id, ok=False, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        if trial_dir.local is None:
            shutil.rmtree(work, ignore_errors=True)  # the private scratch folder (tempfile.mkdtemp)


def drop_bundles(out: Path, trial_dir: Location, topology: str) -> None:
    """``keep_bundles: none``: delete a finished trial's pair bundles (inline: ``checkpoint.pt`` /
    ``best.pt`` and their bucket mirror; split: the Ray Train run's checkpoints) and record that
    none is kept in ``bundles.json``."""
    for name in (CHECKPOINT, BEST):
        (out / name).unlink(missing_ok=True)
    if trial_dir.local is None:
        (trial_dir / "inline").delete()
    if topology != "inline":
        train = trial_dir / "train"
        for name in train.listdir():
            if name.startswith("checkpoint_"):
                (train / name).delete()
    (out / BUNDLES).write_text(json.dumps({}, indent=2))


def _pbt_start(trial_dir: Location, work: Path, bundle: str, in_place: bool):
    """Where a PBT trial starts: ``(start, epoch)``. A restored trial or a PBT exploit starts
    from the Tune checkpoint (a donor's pair bundle): copied to ``work``, or -- ``in_place``,
    with bucket storage -- used where Tune persisted it; otherwise from scratch ``(None, 0)``."""
    import uuid

    from ray.train import Checkpoint

    ck = tune.get_checkpoint()
    if ck is None:
        return None, 0
    if in_place and trial_dir.local is None:  # already in the bucket (Tune persisted it there)
        with ck.as_directory() as d:
            return Checkpoint(path=ck.path, filesystem=ck.filesystem), load_bundle(Path(d) / bundle)["epoch"]
    start = work / f"start-{uuid.uuid4().hex[:6]}"
    with ck.as_directory() as d:
        shutil.copytree(d, start)
    return start, load_bundle(start / bundle)["epoch"]


def _outputs_of_finished_start(cfg, start, bundle: str, out: Path) -> dict:
    """A PBT exploit may hand a trial a donor bundle that is already at the last epoch: nothing
    is left to train, and the trial's outputs are the donor's (its history and summary)."""
    from mergenet_core.loop import FINAL, METRICS, summarise, write_metrics

    with (start.as_directory() if hasattr(start, "as_directory") else contextlib.nullcontext(start)) as d:
        history = load_bundle(Path(d) / bundle)["history"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    write_metrics(out / METRICS, history)
    final = summarise([r for r in history if "target/val_acc" in r])
    (out / FINAL).write_text(json.dumps(final, indent=2))
    return final


def _report_segment(folder: Path, bundle: str) -> None:
    """Report a PBT segment's last record with its whole pair bundle (models, optimisers, method
    state, RNG, history) as the Tune checkpoint: an exploit copies the whole pair."""
    last = load_bundle(folder / bundle)["history"][-1]
    tune.report(numeric(last), checkpoint=tune.Checkpoint.from_directory(str(folder)))


def _pbt_segments(grid: GridConfig, cfg, trial_dir: Location, work: Path, out: Path, logger) -> dict:
    """PBT, split topology: train ``perturbation_interval`` epochs per TorchTrainer run and
    report each segment's pair bundle as the Tune checkpoint.

    ``work`` is the trial folder itself when it is local, else a local scratch folder; the
    bundle a segment starts from must be readable by every Train worker, so with a bucket it is
    a checkpoint in the bucket (Tune's own, or the previous segment's bundle uploaded there)."""
    from ray.train import Checkpoint

    from orchestrator.cluster.worker import BUNDLE

    start, epoch = _pbt_start(trial_dir, work, BUNDLE, in_place=True)
    storage_path, storage_fs = (trial_dir / "segments").ray_storage()
    final: dict = {}
    while epoch < cfg.target.recipe.epochs:
        until = min(cfg.target.recipe.epochs, epoch + grid.scheduler.perturbation_interval)
        final = run_pair_on_ray(cfg, out, storage_path=storage_path, storage_filesystem=storage_fs,
                                name=f"seg-{until:04d}", callbacks=[logger], start_from=start, until_epoch=until,
                                keep_bundles=grid.bundles_while_running)
        local = work / f"bundle-{until:04d}"
        local.mkdir(exist_ok=True)
        shutil.move(str(out / BUNDLE), local / BUNDLE)
        if trial_dir.local is not None:
            start = local
        else:
            remote = trial_dir / local.name
            remote.upload(local)
            start = Checkpoint(path=remote.path, filesystem=remote.fs)
        _report_segment(local, BUNDLE)
        epoch = until
    if not final and start is not None:  # started from a donor already at the last epoch
        final = _outputs_of_finished_start(cfg, start, BUNDLE, out)
    return final


def short_params(grid: GridConfig, pair: str, arm: str, hp: dict, config_params: dict[str, str]) -> dict[str, str]:
    """What varies across the grid, as short top-level params for MLflow's runs table: ``arm``,
    ``pair``, and each search axis by the shortest suffix of its dotted field that no other axis
    and no top-level config param shares (``method.options.adapter.lr`` -> ``lr``, or
    ``adapter.lr`` if another axis ends in ``lr``). ``seed`` is a config param already."""
    out = {"arm": arm, "pair": pair}
    keys = list(hp)
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[i:])
            clash = any(o != k and (o == name or o.endswith("." + name)) for o in keys)
            if not clash and name not in out and (name == k or name not in config_params):
                break
        if name != k:  # a top-level field (seed) is logged under its own name already
            out[name] = str(hp[k])
    return out


def run_name(arm: str, seed: int, pair: str, short: dict[str, str]) -> str:
    """``mergenet s3 · r18-mbv2 lr=0.001``: arm and seed first (the runs table cuts long names)."""
    extra = " ".join(f"{k}={v}" for k, v in short.items() if k not in ("arm", "pair"))
    return f"{arm} s{seed} · {pair}" + (f" {extra}" if extra else "")


def _pbt_inline(grid: GridConfig, cfg, trial_dir: Location, work: Path, out: Path, uri: str, run_id: str) -> dict:
    """PBT, inline topology: ``perturbation_interval`` epochs per segment in this process, each
    segment's pair bundle (``checkpoint.pt``) reported as the Tune checkpoint; an exploit starts
    from the donor's bundle, a restarted trial from its own."""
    c = tracking.client(uri)
    start, epoch = _pbt_start(trial_dir, work, CHECKPOINT, in_place=False)
    if start is None and (out / CHECKPOINT).exists():
        epoch = load_bundle(out / CHECKPOINT)["epoch"]
    final: dict = {}
    while epoch < cfg.target.recipe.epochs:
        until = min(cfg.target.recipe.epochs, epoch + grid.scheduler.perturbation_interval)
        final = run_pair_inline(cfg, out, keep_bundles="last", start_from=start, until_epoch=until,
                                on_epoch=lambda r: tracking.log_metrics(c, run_id, numeric(r), step=int(r["epoch"])))
        seg = work / f"bundle-{until:04d}"
        seg.mkdir(exist_ok=True)
        shutil.copy2(out / CHECKPOINT, seg / CHECKPOINT)
        _report_segment(seg, CHECKPOINT)
        start, epoch = None, until
    if not final and start is not None:  # started from a donor already at the last epoch
        final = _outputs_of_finished_start(cfg, start, CHECKPOINT, out)
    return final


def pair_labels(grid: GridConfig, pair: str) -> dict[str, str]:
    """``model@task`` of the pair's source and target (also on ``alone`` trials, for the report)."""
    p = next(x for x in grid.pairs if x.name == pair)

    def label(d):
        return f"{d['model']['name']}@{d['task']['name']}" if d else "-"

    src = deep_merge(grid.base.get("source", {}), p.source or {}) if (p.source or grid.base.get("source")) else None
    return {"mergenet.source": label(src), "mergenet.target": label(deep_merge(grid.base.get("target", {}), p.target))}


# --------------------------------------------------------------------------- driver callbacks


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
        f = trial_folder(self.grid_dir, trial.trial_id) / tracking.RUN_ID_FILE  # Location: local or bucket
        if not f.exists():
            return
        c = tracking.client(self.uri)
        run_id = f.read_text().strip()
        if c.get_run(run_id).info.status == "RUNNING":
            if ok:
                c.set_tag(run_id, "mergenet.stopped_by", "scheduler")
            tracking.end_run(c, run_id, ok=ok, reason=reason)


def _mmss(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _short(config: dict) -> str:
    hp = config.get("hp") or {}
    extra = " ".join(f"{'.'.join(k.split('.')[-2:])}={v:.4g}" if isinstance(v, float)
                     else f"{'.'.join(k.split('.')[-2:])}={v}" for k, v in hp.items())
    return f"{config.get('pair')}/{config.get('method')}/s{config.get('seed')}" + (f" {extra}" if extra else "")


def _error_text(trial) -> str:
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and Path(path).exists() and attr == "error_file":
            return Path(path).read_text()[-4000:]
    return str(getattr(trial, "error_msg", "") or "")


# --------------------------------------------------------------------------- tuner


def trial_resources(grid: GridConfig):
    """Per trial: an inline pair trains in the trial process, which therefore holds the pair's
    CPUs (``resources.cpus_per_worker``) or GPU; a split pair's trial is only the driver of its
    Ray Train worker group (``resources.trial_driver_cpus``)."""
    from ray.tune import PlacementGroupFactory

    def resources(config: dict) -> PlacementGroupFactory:
        try:
            cfg = grid.trial_config(config["pair"], config["method"], config["seed"], dict(config.get("hp") or {}))
        except Exception:  # noqa: BLE001 - validated before the grid starts; be safe on restore
            return PlacementGroupFactory([{"CPU": grid.resources.trial_driver_cpus}])
        if choose_topology(cfg) == "inline":
            need = {"CPU": cfg.ray.cpus_per_worker}
            if cfg.ray.use_gpu:
                need["GPU"] = 1
            return PlacementGroupFactory([need])
        return PlacementGroupFactory([{"CPU": grid.resources.trial_driver_cpus}])

    return resources


def _axis(a, pbt: bool = False):
    if a.grid is not None:  # a named grid: its labels (the trial config resolves them)
        return list(a.grid) if pbt else tune.grid_search(list(a.grid))
    if a.choice is not None:
        return tune.choice(a.choice)
    if a.loguniform is not None:
        return tune.loguniform(*a.loguniform)
    return tune.uniform(*a.uniform)


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
                                       hyperparam_mutations={"hp": {k: _axis(a, pbt=True)
                                                                    for k, a in s.hyperparam_mutations.items()}})
    return None


def _uniform_resources(grid: GridConfig) -> bool:
    """Every trial asks for the same resources (Tune reuses a trial process only then)."""
    need = trial_resources(grid)
    seen = {repr(need({"pair": p.name, "method": arm, "seed": grid.seeds[0], "hp": {}}).bundles)
            for p in grid.pairs for arm in grid.methods}
    return len(seen) == 1


def _trial_name(trial) -> str:
    c = trial.config
    return f"{c.get('pair')}-{c.get('method')}-s{c.get('seed')}-{trial.trial_id.split('_')[-1]}"[:80]


def build_tuner(grid: GridConfig, storage: Location, parent_run_id: str, experiment_id: str, uri: str,
                restore: bool = False, verbose: bool = False) -> tune.Tuner:
    """``storage``: the folder holding the grid's folder (local, or a bucket URI). Ray gets a
    bucket as ``storage_path`` + ``storage_filesystem`` (the file system resolved from the URI,
    endpoint options included), so URI query parameters never have to survive Ray's path joins."""
    grid_dir = storage / grid.grid
    storage_path, storage_fs = storage.ray_storage()
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, grid_json=grid.model_dump_json(), parent_run_id=parent_run_id,
                             experiment_id=experiment_id, uri=uri, sha=tracking.git_sha(),
                             grid_dir=str(grid_dir)),
        trial_resources(grid))
    if restore:
        return tune.Tuner.restore(grid_dir.ray_storage()[0], trainable, resume_errored=True,
                                  storage_filesystem=storage_fs)
    epochs = grid.trial_config(grid.pairs[0].name, next(iter(grid.methods)), grid.seeds[0]).target.recipe.epochs
    space = {"pair": tune.grid_search([p.name for p in grid.pairs]),
             "method": tune.grid_search(list(grid.methods)),
             "seed": tune.grid_search(grid.seeds),
             "hp": {**{k: _axis(a) for k, a in grid.search.items()},
                    **{k: _axis(a, pbt=True) if a.grid is None else tune.choice(list(a.grid))
                       for k, a in grid.scheduler.hyperparam_mutations.items() if k not in grid.search}}}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(num_samples=grid.num_samples, scheduler=_scheduler(grid, epochs),
                                    max_concurrent_trials=grid.max_concurrent_trials,
                                    # one trial process serves trial after trial (no Python + torch
                                    # start per trial); every trial asks for the same resources
                                    reuse_actors=grid.scheduler.name != "pbt" and _uniform_resources(grid),
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=grid.grid, storage_path=storage_path, storage_filesystem=storage_fs,
                                  failure_config=tune.FailureConfig(max_failures=grid.max_failures),
                                  callbacks=[GridProgress(uri, grid.trial_count(), str(grid_dir))],
                                  verbose=1 if verbose else 0),
    )


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


def run_grid(grid: GridConfig | None, address: str | None = None, resume_dir: str | None = None,
             verbose: bool = False) -> dict:
    """Submit (or resume) a grid; returns a summary with the MLflow ids and trial states."""
    uri = tracking.tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # reaches every worker through the runtime env
    if address or os.environ.get("RAY_ADDRESS"):  # an unreachable address fails before any run or folder exists
        from orchestrator.cluster.connect import CONNECT_TIMEOUT_S
        from orchestrator.secrets import probe_address

        probe_address(address or os.environ["RAY_ADDRESS"], CONNECT_TIMEOUT_S)
    if resume_dir:
        exp_dir = Location.parse(resume_dir)
        if not (exp_dir / GRID_FILE).exists():
            raise MergenetError(f"--resume: {exp_dir} is not a mergenet grid folder (no {GRID_FILE})")
        grid = GridConfig.model_validate_json((exp_dir / GRID_FILE).read_text())
        storage = exp_dir.parent
    else:
        storage = Location.parse(grid.storage_path or "runs/grids")
        exp_dir = storage / grid.grid
        if (exp_dir / GRID_FILE).exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            exp_dir.move_to(storage / f"{grid.grid}.{stamp}")  # keep the old submission's files
    c = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(c, grid.grid)
    exp_dir.mkdir()
    (exp_dir / GRID_FILE).write_text(grid.model_dump_json(indent=2))
    parent = tracking.attach_or_create(
        c, exp_dir, experiment_id, f"{grid.grid}-{time.strftime('%Y%m%d-%H%M%S')}",
        {"mergenet.grid": grid.grid, "mergenet.git_sha": tracking.git_sha(), "mergenet.kind": "submission"})
    (exp_dir / PARENT_FILE).write_text(parent)
    tracking.log_params(c, parent, tracking.flatten(grid.model_dump(mode="json")))
    print(f"grid {grid.grid}: {grid.trial_count()} trials; MLflow {uri} experiment {experiment_id} "
          f"run {parent}; storage {exp_dir}", flush=True)
    local_ray = not (address or os.environ.get("RAY_ADDRESS"))
    quiet_console(verbose=verbose, local_ray=local_ray)
    # the driver's Ray loggers at WARNING: no "Started a local Ray instance" / Tune INFO lines
    ensure_ray(address, **({} if verbose else {"logging_level": logging.WARNING}))
    try:
        tuner = build_tuner(grid, storage, parent, experiment_id, uri, restore=bool(resume_dir), verbose=verbose)
        results = tuner.fit()
    except BaseException as e:
        tracking.end_run(c, parent, ok=False, reason=f"{type(e).__name__}: {e}")
        raise
    errors = [r for r in results if r.error is not None]
    summary = {"experiment_id": experiment_id, "parent_run_id": parent, "storage": str(exp_dir),
               "trials": len(results), "failed": len(errors)}
    tracking.end_run(c, parent, ok=not errors,
                     reason=f"{len(errors)} of {len(results)} trials failed" if errors else None)
    return summary
