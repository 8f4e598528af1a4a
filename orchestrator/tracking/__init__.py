"""MLflow tracking: one experiment per grid, one parent run per submission, one child run per
trial (``mlflow.parentRunId``), flattened params in chunks, per-epoch metrics, artifacts.

Runs are created and ended through ``MlflowClient`` with explicit run ids (no global active
run), so the same code works in the driver, in a Tune trial and in the Train controller.
A run id is written next to what it tracks (the grid's storage folder, the trial folder — local
or in a bucket), so a resumed grid or a restored trial re-attaches its run instead of creating
a duplicate.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 500
CHUNK = 100
TRIAL_TAG = "mergenet.trial"
FOLDER_TAG = "mergenet.folder"  # where a run's id is recorded: found again if the record was never written
RUN_ID_FILE = "mlflow_run_id"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded default ``sqlite:///<cwd>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


#: the experiment tag MLflow 3's UI reads to pick an experiment's kind, and the value for model
#: training ("Machine learning"): the experiment then opens on its runs table, not on GenAI traces
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

#: counters, not measurements: never logged as metrics (the step of every metric says it)
NOT_METRICS = frozenset({"epoch", "epochs", "step", "steps"})


def existing_client(uri: str | None = None) -> MlflowClient:
    """A client for reading only: a sqlite store that does not exist is an error, not a new
    empty database (read-only commands create no files)."""
    from mergenet_core.errors import MergenetError

    uri = uri or tracking_uri()
    if uri.startswith("sqlite:"):
        db = Path(uri.split("///", 1)[-1]) if "///" in uri else None
        if db is not None and not db.is_file():
            raise MergenetError(f"no MLflow database at {db} (set MLFLOW_TRACKING_URI, or run from the folder "
                                "that holds mlflow.db)")
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    uri = c.tracking_uri
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # a local backend: keep artifacts beside the database, whatever the logging process's cwd
        db = Path(uri.split("///", 1)[-1]) if uri.startswith("sqlite:") else Path.cwd()
        location = (db.parent / "mlartifacts").resolve().as_uri()
    return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` with values cut to MLflow's 500 characters."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        s = json.dumps(d) if isinstance(d, (list, tuple)) else str(d)
        if len(s) > MAX_PARAM_CHARS:
            s = s[: MAX_PARAM_CHARS - 3] + "..."
        out[prefix[:-1]] = s
    return out


def _chunks(items: list, n: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_params(c: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    existing = c.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    for chunk in _chunks(todo):
        c.log_batch(run_id, params=chunk)


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, Any], step: int) -> None:
    ts = int(time.time() * 1000)
    ms = [Metric(k, float(v), ts, step) for k, v in metrics.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_METRICS]
    for chunk in _chunks(ms, 500):
        c.log_batch(run_id, metrics=chunk)


def git_sha() -> str:
    try:
        # the checkout this code runs from, not the working directory (a grid runs anywhere; a
        # Tune trial's working directory is its trial folder)
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def attach_or_create(c: MlflowClient, folder, experiment_id: str, name: str, tags: dict[str, str],
                     reopen_finished: bool = True) -> str:
    """The run recorded in ``folder`` (re-opened as RUNNING), else a new one recorded there.
    ``folder``: a local path or an :class:`orchestrator.cluster.storage.Location` (a bucket folder).
    A FAILED or KILLED run is re-opened without its end's tags (a resumed trial is not stopped any
    more); a FINISHED one only with ``reopen_finished`` (a trial's finished run stays finished)."""
    from orchestrator.cluster.storage import Location

    loc = folder if isinstance(folder, Location) else Location.parse(folder)
    f = loc / RUN_ID_FILE
    run = None
    if f.exists():
        try:
            run = c.get_run(f.read_text().strip())
        except Exception:  # noqa: BLE001 - a stale id from another tracking server: start afresh
            run = None
    if run is None:
        run = _orphan(c, experiment_id, loc)
        if run is not None:
            f.write_text(run.info.run_id)
    if run is not None:
        run_id, status = run.info.run_id, run.info.status
        if status in ("FAILED", "KILLED"):
            for tag in (STOPPED_BY, STOPPED_AT, "mergenet.failure_reason", "mlflow.note.content"):
                if tag in run.data.tags:
                    c.delete_tag(run_id, tag)
        if status != "RUNNING" and (status != "FINISHED" or reopen_finished):
            c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(experiment_id, run_name=name, tags={**tags, FOLDER_TAG: str(loc)})
    f.write_text(run.info.run_id)  # creates the folder when local
    return run.info.run_id


def _orphan(c: MlflowClient, experiment_id: str, loc):
    """A run of ``loc`` created by a process killed before it recorded the run's id there: it names
    the folder in a tag and holds nothing yet (no params, no metrics). A run that holds something
    is an earlier run of a folder since emptied, and stays as it is."""
    where = str(loc)
    if "'" in where:  # not expressible in a search filter: no re-attachment for such a folder
        return None
    for run in c.search_runs([experiment_id], f"tags.`{FOLDER_TAG}` = '{where}'",
                             order_by=["attributes.start_time DESC"], max_results=20):
        if not run.data.params and not run.data.metrics:
            return run
    return None


STOPPED_BY = "mergenet.stopped_by"  # scheduler (ASHA stopped it early) or interrupt(SIGINT|SIGTERM)
STOPPED_AT = "mergenet.stopped_at_epoch"  # the last epoch of a trial a scheduler stopped early


def end_run(c: MlflowClient, run_id: str, ok: bool, reason: str | None = None) -> None:
    """FINISHED, or FAILED with ``reason``. A run the driver killed on an interrupt stays KILLED
    whatever a trial process writes afterwards (:func:`kill_run`)."""
    if reason:
        c.set_tag(run_id, "mergenet.failure_reason", reason[:5000])
        c.set_tag(run_id, "mlflow.note.content", f"FAILED: {reason[:5000]}")
    c.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    if c.get_run(run_id).data.tags.get(STOPPED_BY, "").startswith("interrupt"):
        c.set_terminated(run_id, status="KILLED")


def kill_run(c: MlflowClient, run_id: str, signame: str, what: str = "interrupted") -> None:
    """KILLED by an interrupt: the tag first (so a trial's later :func:`end_run` honours it),
    then the state."""
    c.set_tag(run_id, STOPPED_BY, f"interrupt({signame})")
    c.set_tag(run_id, "mlflow.note.content", f"KILLED: {what} by {signame}; `mergenet run --resume` continues it")
    c.set_terminated(run_id, status="KILLED")


#: runs per MLflow search call when reading every run of a submission
PAGE_SIZE = 1000


def all_runs(c: MlflowClient, experiment_id: str, filter_string: str, page_size: int = PAGE_SIZE) -> list:
    """Every run of ``experiment_id`` that matches ``filter_string``, ``page_size`` per call (one
    call's ``max_results`` alone would silently drop the rest of a larger grid)."""
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string, max_results=page_size, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def children(c: MlflowClient, experiment_id: str, parent_run_id: str, page_size: int = PAGE_SIZE) -> list:
    """The child runs (trials) of a submission."""
    return all_runs(c, experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}'", page_size)


