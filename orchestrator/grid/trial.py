"""The Tune trial driver of ``mergenet run``: one pair, one MLflow child run.

Train V2 pattern: every trial is a Tune *function* that runs its pair through the pair's
topology (:func:`orchestrator.topology.choose`): in this process (``inline``) or as a Ray Train
worker group it drives (``split``); each epoch's record reaches Tune (for ASHA and the progress
table) and the trial's MLflow child run. With PBT the pair trains segment by segment
(:func:`orchestrator.topology.pbt.run_pbt`). The driver knows no topology by name.

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

from mergenet_core.config import deep_merge
from mergenet_core.io import CONFIG, CURVE, FINAL, METRICS, PAIR_OUTPUTS, PLACEMENT
from mergenet_core.io.outputs import RunOutputs, summarise
from mergenet_core.training.loop import numeric
from orchestrator import topology, tracking
from orchestrator.grid.config import GridConfig
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
            "mergenet.config_hash": config_hash(cfg), **pair_labels(grid, pair)}
    params = tracking.flatten(cfg.model_dump(mode="json"))
    short = short_params(grid, pair, arm, hp, params)
    run_id = tracking.attach_or_create(c, trial_dir, experiment_id, run_name(arm, seed, pair, short), tags,
                                       reopen_finished=False)
    run = c.get_run(run_id)
    if run.info.status == "FINISHED":  # finished before an interruption Tune's state did not record
        tune.report(dict(run.data.metrics))
        return
    try:
        params.update({f"hp.{k}": str(v) for k, v in hp.items()})
        params.update(short)
        tracking.log_params(c, run_id, params)
        out = work / "pair"
        topo = topology.choose(cfg)
        c.set_tag(run_id, "mergenet.topology", topo.name)
        reporter = topology.ReporterSpec(uri, run_id)
        if grid.scheduler.name == "pbt":
            final = run_pbt(topo, cfg, store=trial_dir, work=work, out=out, reporter=reporter,
                            interval=grid.scheduler.perturbation_interval, keep_bundles=grid.bundles_while_running)
        else:
            final = topo.run(cfg, topology.RunRequest(out, trial_dir, keep_bundles=grid.bundles_while_running,
                                                      reporter=reporter))
        placement = json.loads((out / PLACEMENT).read_text()) if (out / PLACEMENT).exists() else []
        for w in placement:
            c.set_tag(run_id, f"mergenet.node.{w['role']}{w['role_rank']}", w["node_id"])
        if grid.keep_bundles == "none":
            topo.drop_bundles(out, trial_dir)
            RunOutputs(out).no_bundles()
        tracking.learning_curve_png(RunOutputs(out).read_history(), out / "learning_curve.png", title=cfg.name)
        (trial_dir / "pair").upload(out, list(PAIR_OUTPUTS))  # nothing to do when the folder is local
        log_outputs(c, run_id, out, final)
        tracking.end_run(c, run_id, ok=True)
    except BaseException as e:
        if not tune_ended(e):  # a stop or a pause: the driver records which (end_stopped)
            tracking.end_run(c, run_id, ok=False, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        if trial_dir.local is None:
            shutil.rmtree(work, ignore_errors=True)  # the private scratch folder (tempfile.mkdtemp)


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
    (:func:`orchestrator.tracking.report.at_common_epoch`)."""
    out = (folder / "pair").local
    history = RunOutputs(out).read_history() if out is not None else []
    last = history[-1]["epoch"] if history else None
    if history:
        _log_missing_epochs(c, run_id, history)
        log_outputs(c, run_id, out, RunOutputs(out).finish(summarise(history)))
    config = out / CONFIG if history else None
    budget = json.loads(config.read_text())["target"]["recipe"]["epochs"] if config and config.exists() else None
    if last is None or budget is None or last < budget:
        c.set_tag(run_id, tracking.STOPPED_BY, "scheduler")
        if last is not None:
            c.set_tag(run_id, tracking.STOPPED_AT, str(last))
    tracking.end_run(c, run_id, ok=True)


def _log_missing_epochs(c, run_id: str, history: list[dict]) -> None:
    """The epoch records the run lacks (an inline trial logs an epoch once its bundle is saved;
    a stop in between leaves that epoch out)."""
    logged = {m.step for m in c.get_metric_history(run_id, "time/epoch_s")}
    for r in history:
        if r["epoch"] not in logged:
            tracking.log_metrics(c, run_id, numeric(r), step=int(r["epoch"]))


def config_hash(cfg) -> str:
    """12 hex digits of the SHA-256 of the trial's config as JSON with sorted keys, seed included
    and its ``name`` (``GRID.PAIR.ARM.sSEED``) left out: the same config gives the same hash in
    any grid and under any arm name (the report's ``config_hash``)."""
    import hashlib

    data = cfg.model_dump(mode="json", exclude={"name"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


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


def pair_labels(grid: GridConfig, pair: str) -> dict[str, str]:
    """``model@task`` of the pair's source and target (also on ``alone`` trials, for the report)."""
    p = next(x for x in grid.pairs if x.name == pair)

    def label(d):
        return f"{d['model']['name']}@{d['task']['name']}" if d else "-"

    src = deep_merge(grid.base.get("source", {}), p.source or {}) if (p.source or grid.base.get("source")) else None
    return {"mergenet.source": label(src), "mergenet.target": label(deep_merge(grid.base.get("target", {}), p.target))}


