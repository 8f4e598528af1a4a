"""The one way a grid trial's epochs reach MLflow: Tune's results, read in the driver.

A trial's pair reports each epoch's record through Ray (``tune.report`` inline, ``train.report``
forwarded to Tune in the split topology; a PBT segment's report carries the segment's epochs under
:data:`EPOCHS`). :class:`MlflowEpochs` is a Tune callback in the driver: it logs every epoch of
every result to the trial's MLflow run at ``step = epoch``. The trial finds its run in its folder
(``trials/<trial id>/mlflow_run_id``, written before its first report). Progress lines
(:mod:`orchestrator.grid.progress`), ASHA and PBT read the same results.
"""
from __future__ import annotations

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from orchestrator import tracking

#: a PBT segment's report: the records of the segment's epochs (the report itself is its last)
EPOCHS = "mergenet/epochs"
#: a report that repeats what the run already holds (a trial found finished on a resume)
REPLAYED = "mergenet/replayed"
#: what Tune adds to every result; never a metric of the pair
NOT_PAIR = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", EPOCHS, REPLAYED}


def epoch_metrics(record: dict) -> dict:
    """The pair's numbers in one epoch's record (Tune's own keys and bundle bookkeeping left out)."""
    return {k: v for k, v in record.items() if k not in NOT_PAIR and not k.startswith("checkpoint/")}


class MlflowEpochs(Callback):
    """Each epoch of each trial's results to the trial's MLflow run (``step = epoch``)."""

    def __init__(self, uri: str, grid_folder: str):
        self.uri, self.grid_folder = uri, grid_folder
        self._runs: dict[str, str] = {}
        self._client = None

    def _run(self, trial) -> str | None:
        if trial.trial_id not in self._runs:
            from orchestrator.cluster.storage import Location

            f = Location.parse(self.grid_folder) / "trials" / trial.trial_id / tracking.RUN_ID_FILE
            if not f.exists():
                return None
            self._runs[trial.trial_id] = f.read_text().strip()
        return self._runs[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(REPLAYED):
            return
        run_id = self._run(trial)
        if run_id is None:
            return
        if self._client is None:
            self._client = tracking.client(self.uri)
        for record in result.get(EPOCHS) or [result]:
            tracking.log_metrics(self._client, run_id, epoch_metrics(record), step=int(record.get("epoch", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        """The epochs no result of this driver carried: a trial interrupted after reporting an
        epoch that an earlier driver never read, and resumed past it. From the trial's
        ``metrics.jsonl`` (in its folder once it ends), after its last result was logged."""
        import json

        from mergenet_core.io import METRICS
        from orchestrator.cluster.storage import Location

        run_id = self._run(trial)
        f = Location.parse(self.grid_folder) / "trials" / trial.trial_id / "pair" / METRICS
        if run_id is None or not f.exists():
            return
        history = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        log_missing_epochs(self._client or tracking.client(self.uri), run_id, history)


def log_missing_epochs(c, run_id: str, history: list[dict]) -> None:
    """The epoch records the run lacks (by the steps of its ``time/epoch_s``)."""
    from mergenet_core.training.loop import numeric

    logged = {m.step for m in c.get_metric_history(run_id, "time/epoch_s")}
    for r in history:
        if r["epoch"] not in logged:
            tracking.log_metrics(c, run_id, numeric(r), step=int(r["epoch"]))
