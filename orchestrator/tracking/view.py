"""A saved MLflow view per grid: the link ``mergenet run`` prints opens on the answer.

MLflow's UI keeps a *shared view* of an experiment's runs page in an experiment tag,
``mlflow.sharedViewState.<key>``, and restores it from a link with ``viewStateShareKey=<key>``
(the UI's "Share" button writes the same tag). Its value is an envelope
``{"name", "createdAt", "updatedAt", "state"}`` whose ``state`` is the page's state as JSON: the
search facets (``searchFilter``, ``orderByKey``, ``orderByAsc``, ...) and the UI state
(``selectedColumns``, ``groupBy``, ``runsHiddenMode``, ``chartsSearchFilter``, ...). The UI
ignores the shared state when the link carries any search facet of its own, so the link names
only the key and the workflow type.

The view of a submission: its trial runs only; the columns arm, pair, seed, the target's test
accuracy at the best-validation epoch and at the final epoch, the best validation accuracy and
the per-seed gains over the baseline; grouped by pair and arm (averages; the report has the
paired intervals); every run shown (not the first 10); charts filtered to the accuracies.
"""
from __future__ import annotations

import json
import time
from urllib.parse import quote

from orchestrator import tracking

PREFIX = "mlflow.sharedViewState."
#: the state fields the UI restores from a shared view (MLflow 3.x: search facets, then UI state)
SEARCH_FACETS = ("searchFilter", "orderByKey", "orderByAsc", "startTime", "lifecycleFilter", "modelVersionFilter",
                 "datasetsFilter")
UI_FIELDS = ("selectedColumns", "columnOrder", "columnWidths", "runsHiddenMode", "compareRunCharts", "compareRunSections",
             "viewMaximized", "runListHidden", "isAccordionReordered", "groupBy", "groupsExpanded",
             "useGroupedValuesInCharts", "hideEmptyCharts", "globalLineChartConfig", "chartsSearchFilter")
#: the summary metrics the view shows, primary first (the report's verdicts use the first)
SUMMARY = ("target/test_acc_at_best_val", "target/final_test_acc", "target/best_val_acc")


def share_key(grid: str) -> str:
    """The view's key: one per grid (a new submission rewrites it to show its own trials)."""
    import re

    return "mergenet-" + re.sub(r"[^A-Za-z0-9_-]", "-", grid)


def column(kind: str, name: str) -> str:
    """The UI's column key: ``params.`arm```, ``metrics.`target/final_test_acc```."""
    return f"{kind}.`{name}`"


def view_state(parent_run_id: str, baseline: str = "alone", several_pairs: bool = True) -> dict:
    """The runs page's state for one submission's trials."""
    gains = [f"gain_vs_{baseline}/{m.split('/')[-1]}" for m in SUMMARY[:2]]
    cols = ([column("params", p) for p in ("arm", "pair", "seed")]
            + [column("metrics", m) for m in (*SUMMARY, *gains)])
    keys = ([{"mode": "param", "groupByData": "pair"}] if several_pairs else []) + [{"mode": "param",
                                                                                   "groupByData": "arm"}]
    return {
        "searchFilter": f"tags.`{tracking.TRIAL_TAG}` = '1' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": column("metrics", SUMMARY[0]), "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
        # wide enough for the metric names and arm names like `mergenet_untrained`
        "selectedColumns": cols, "columnOrder": cols,
        "columnWidths": {c: 190 if c.startswith("metrics.") else 60 if c.endswith("`seed`") else 150 for c in cols},
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average", "groupByKeys": keys}, "groupsExpanded": {},
        "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "chartsSearchFilter": "test_acc",
        "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
    }


def write_view(c, experiment_id: str, grid: str, parent_run_id: str, baseline: str = "alone",
               several_pairs: bool = True) -> str:
    """Write the submission's view into the experiment's tags; returns its key."""
    key = share_key(grid)
    now = int(time.time() * 1000)
    state = view_state(parent_run_id, baseline, several_pairs)
    envelope = {"name": f"{grid}: trials by arm", "createdAt": now, "updatedAt": now,
                "state": json.dumps(state, separators=(",", ":"))}
    c.set_experiment_tag(experiment_id, PREFIX + key, json.dumps(envelope, separators=(",", ":")))
    return key


def read_view(c, experiment_id: str, key: str) -> dict | None:
    """The state stored under ``key`` (what the UI restores), or None."""
    value = c.get_experiment(experiment_id).tags.get(PREFIX + key)
    return None if value is None else json.loads(json.loads(value)["state"])


def view_url(uri: str, experiment_id: str, key: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The link that opens the saved view (``ui``: where ``mlflow ui`` runs for a local store;
    a tracking server is its own UI)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return (f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(key, safe='')}"
            "&workflowType=machine_learning")


def run_url(experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A link inside the UI (relative: it works on whatever host serves the UI)."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    return path + (f"/artifacts/{artifact}" if artifact else "")
