"""The report's first step: read a submission's records. Its trials from MLflow (every run, page
by page), their per-epoch histories (the grid's folder, else the runs' artifacts), the grid's
stored config, and the comparison of trials a scheduler stopped early at a common epoch."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from mergenet_core.errors import MergenetError
from orchestrator import tracking
from orchestrator.tracking import paired

METRICS = tuple(paired.METRICS.values())
#: what the last ``mergenet run`` of a grid wrote of itself, in the grid's folder
RUN_ACCOUNT = "run_account.md"


def resolve_experiment(c, what: str) -> tuple[str, str, str | None]:
    """(experiment id, name, parent run id or None) from a grid YAML, a grid folder (local or a
    bucket URI) or a name."""
    from orchestrator.cluster.storage import Location

    parent = None
    name = what
    p = Path(what)
    folder = Location.parse(what) if "://" in what or p.is_dir() else None
    if folder is not None and (folder / "mergenet_grid.json").exists():
        name = json.loads((folder / "mergenet_grid.json").read_text())["grid"]
        f = folder / "mlflow_parent_run_id"
        parent = f.read_text().strip() if f.exists() else None
    elif p.is_file():
        from orchestrator.grid.load import load_grid

        name = load_grid(p, deep=False).grid
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise MergenetError(f"report: no MLflow experiment '{name}' at {c.tracking_uri}")
    if parent is None:
        runs = c.search_runs([exp.experiment_id], "tags.`mergenet.kind` = 'submission'",
                             order_by=["attributes.start_time DESC"], max_results=1)
        parent = runs[0].info.run_id if runs else None
    return exp.experiment_id, name, parent


def setting_lines(c, name: str, parent: str | None, grid_file: str | Path | None = None) -> list[str]:
    """What the grid ran, from its stored config (``runs/grids/NAME/mergenet_grid.json`` or
    ``grid_file``): per pair the source and target (model, data set named plainly, options,
    ``init_from``), the recipe, seeds and arms; and the submission's wall time from MLflow."""
    from mergenet_core.data import task_title
    from orchestrator.grid.config import uses_source

    out = []
    g = stored_grid(name, grid_file)
    if g is not None:
        for p in g.pairs:
            t = g.trial_dict(p.name, next(iter(g.methods)), g.seeds[0])
            # the pair's own source: an arm that overrides it (a transplant's donor) says so below
            users = [a for a in g.methods if uses_source(g.method_of(a))]
            own = [a for a in users if "source" not in (p.arms or {}).get(a, {})]
            src = g.trial_dict(p.name, (own or users or list(g.methods))[0], g.seeds[0]).get("source")
            for role, spec in (("source", src), ("target", t["target"])):
                if not spec:
                    continue
                task = spec["task"]
                init = spec.get("init_from")
                init = init if isinstance(init, str) or init is None else init.get("path")
                out.append(f"- pair `{p.name}`, {role}: `{spec['model']['name']}` "
                           f"{json.dumps(spec['model'].get('options', {}))} on **{task_title(task['name'])}** "
                           f"{json.dumps(task.get('options', {}))}"
                           + (f"; starts from `{Path(init).name if '://' not in init else init}`"
                              f" (`init_from`)" if init else ""))
            r = t.get("recipe", {})
            out.append(f"- recipe: {json.dumps(r)}")
            if p.arms:
                out.append(f"- pair `{p.name}`, per-arm settings: "
                           + "; ".join(f"`{a}` {json.dumps(v)}" for a, v in p.arms.items()))
        out.append(f"- seeds: {g.seeds}; arms: "
                   + "; ".join(f"`{a}` = {g.method_of(a)} {json.dumps({k: v for k, v in o.items() if k != 'method'})}"
                               for a, o in g.methods.items()))
    if parent:
        info = c.get_run(parent).info
        if info.end_time and info.start_time:
            out.append(f"- wall time of the submission (`mergenet run`, MLflow parent run start → end): "
                       f"{(info.end_time - info.start_time) / 60000:.1f} min")
    return out


def score_name(grid) -> str:
    """What the targets' ``acc`` is in ``grid`` (a :class:`GridConfig`, or None): "accuracy", or
    the modality's own measure (a retrieval target's ``acc`` is image→text recall@1); a grid
    mixing them says both."""
    from mergenet_core.data import TASKS, get_modality

    scores = set()
    for p in (grid.pairs if grid is not None else []):
        task = grid.trial_dict(p.name, next(iter(grid.methods)), grid.seeds[0])["target"]["task"]["name"]
        scores.add(get_modality(TASKS.get(task).meta.get("modality", "image")).score if task in TASKS else "accuracy")
    if len(scores) <= 1:
        return scores.pop() if scores else "accuracy"
    return "accuracy (" + ", ".join(sorted(scores - {"accuracy"})) + " for retrieval targets)"


def stored_grid(name: str, grid_file: str | Path | None = None):
    """The grid's stored config (``runs/grids/NAME/mergenet_grid.json`` or ``grid_file``), or None."""
    from orchestrator.cluster.storage import Location
    from orchestrator.grid.config import GridConfig

    f = Location.parse(grid_file) if grid_file else Location.parse("runs/grids") / name / "mergenet_grid.json"
    return GridConfig.model_validate_json(f.read_text()) if f.exists() else None


def _numeric(col: pd.Series) -> pd.Series:
    """A parameter column as numbers when every value is one, as booleans when every value is
    ``True``/``False`` (``None``: missing), ``None`` strings as missing (MLflow params are strings)."""
    known = col.where(col != "None", None)
    if known.dropna().isin(["True", "False"]).all() and known.notna().any():
        return known.map({"True": True, "False": False}).astype("boolean")
    try:
        return pd.to_numeric(known)
    except (ValueError, TypeError):
        return col


def _utc(ms: int | None):
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else pd.NaT


def trials_frame(c, experiment_id: str, parent: str | None, page_size: int = tracking.PAGE_SIZE) -> pd.DataFrame:
    """One row per trial: ids, pair, arm (the grid's ``methods`` key), method, seed, status, its
    end's tags (``failure_reason``; ``stopped_by``, ``stopped_at``: the last epoch of a trial a
    scheduler stopped early), every metric, and every parameter (``hp.*`` search axes as logged,
    the rest as ``param.*``). Reads every trial run, ``page_size`` runs per MLflow call."""
    flt = f"tags.`{tracking.TRIAL_TAG}` = '1'"
    if parent:
        flt += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = tracking.all_runs(c, experiment_id, flt, page_size=page_size)
    rows = []
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        method = t.get("mergenet.method")
        row = {"run_id": r.info.run_id, "parent_run_id": t.get("mlflow.parentRunId"),
               "trial_id": t.get("mergenet.trial_id"), "run_name": r.info.run_name, "status": r.info.status,
               "pair": t.get("mergenet.pair"), "arm": t.get("mergenet.arm") or method, "method": method,
               "seed": int(t.get("mergenet.seed", -1)), "source": t.get("mergenet.source"),
               "target": t.get("mergenet.target"), "start_time": _utc(r.info.start_time),
               "end_time": _utc(r.info.end_time), "git_sha": t.get("mergenet.git_sha"),
               "config_hash": t.get("mergenet.config_hash"), "failure_reason": t.get("mergenet.failure_reason"),
               "stopped_by": t.get(tracking.STOPPED_BY), "stopped_at": float(t.get(tracking.STOPPED_AT) or "nan")}
        for k, v in r.data.params.items():
            row[k if k.startswith("hp.") else f"param.{k}"] = v
        row.update(m)
        rows.append(row)
    if not rows:
        raise MergenetError("report: the grid has no trial runs yet")
    df = pd.DataFrame(rows)
    for col in df.columns:
        if col.startswith("param."):
            df[col] = _numeric(df[col])
        elif col.startswith("hp."):  # a search axis keeps `None` as a value of its own (its label)
            try:
                df[col] = pd.to_numeric(df[col])
            except (ValueError, TypeError):
                pass
    return df.sort_values(["pair", "arm", "seed"]).reset_index(drop=True)


def history_frame(c, df: pd.DataFrame, folder) -> pd.DataFrame:
    """One row per trial and epoch from each trial's ``metrics.jsonl``: in the grid's folder
    (``trials/<trial id>/pair/``), else the copy logged to its MLflow run (one download per
    trial, no metric-history query)."""
    import tempfile

    from mergenet_core.io import METRICS as HISTORY

    frames = []
    for _, r in df.iterrows():
        f = folder / "trials" / str(r.get("trial_id")) / "pair" / HISTORY if r.get("trial_id") else None
        text = f.read_text() if f is not None and f.exists() else None
        if text is None:  # e.g. the report runs where the grid's folder is not
            if HISTORY not in {a.path for a in c.list_artifacts(r["run_id"])}:
                continue  # a trial that failed before its end logged none
            with tempfile.TemporaryDirectory() as tmp:
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per trial
                text = Path(c.download_artifacts(r["run_id"], HISTORY, tmp)).read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if rows:
            frames.append(pd.DataFrame(rows).assign(run_id=r["run_id"], trial_id=r.get("trial_id"),
                                                    pair=r["pair"], arm=r["arm"], seed=r["seed"],
                                                    status=r["status"]))
    if not frames:
        return pd.DataFrame(columns=["run_id", "trial_id", "pair", "arm", "seed", "status", "epoch"])
    h = pd.concat(frames, ignore_index=True)
    first = ["run_id", "trial_id", "pair", "arm", "seed", "status", "epoch"]
    return h[first + [c for c in h.columns if c not in first]].sort_values(["pair", "arm", "seed", "epoch"],
                                                                          kind="stable").reset_index(drop=True)


def _summary_at(history: pd.DataFrame, epoch: int) -> dict[str, float]:
    """A trial's summary (:func:`mergenet_core.io.outputs.summarise`) over its epochs up to ``epoch``."""
    from mergenet_core.io.outputs import summarise

    rows = history[history["epoch"] <= epoch].to_dict("records")
    return summarise([{k: v for k, v in r.items() if not (isinstance(v, float) and v != v)} for r in rows])


def at_common_epoch(c, df: pd.DataFrame, folder, history: pd.DataFrame | None = None,
                    score: str = "accuracy") -> tuple[pd.DataFrame, list[str]]:
    """Compare trials that a scheduler stopped early (``stopped_at``) honestly: in each pair with
    such a finished trial, every finished trial's summary metrics (the compared ones among them)
    are re-read from its per-epoch history (``history``, else :func:`history_frame`) at the pair's
    *common epoch* -- the last epoch all its finished trials reached -- and ``compared_at_epoch``
    is set. Leaving the stopped trials out instead would keep the ones the scheduler judged best.
    A finished trial without a history there has no value (its verdicts list it). Returns the
    frame and one note per such pair."""
    early = df[(df["status"] == "FINISHED") & df["stopped_at"].notna()] if "stopped_at" in df else df.iloc[0:0]
    if early.empty:
        return df, []
    out, notes = df.copy(), []
    rows = out[(out["status"] == "FINISHED") & out["pair"].isin(set(early["pair"]))]
    h = history if history is not None else history_frame(c, rows, folder)
    for pair, g in rows.groupby("pair", sort=True):
        hist = {run: x for run, x in h[h["run_id"].isin(g["run_id"])].groupby("run_id")}
        epoch = int(min(x["epoch"].max() for x in hist.values())) if hist else 0
        for idx, run in zip(g.index, g["run_id"]):
            summary = _summary_at(hist[run], epoch) if run in hist else {}
            for m in {*METRICS, *summary} & set(out.columns):
                out.loc[idx, m] = summary.get(m, float("nan"))
            out.loc[idx, "compared_at_epoch"] = epoch
        stopped = early[early["pair"] == pair]
        notes.append(f"pair `{pair}`: the scheduler stopped {len(stopped)} of its {len(g)} finished trials before "
                     "the recipe's last epoch (" + ", ".join(f"`{a}` s{x} at epoch {int(e)}" for a, x, e in zip(
                         stopped["arm"], stopped["seed"], stopped["stopped_at"])) + f"); every comparison of this "
                     f"pair is at epoch {epoch}, the last epoch all of them reached: test {score} at epoch {epoch} "
                     f"(\"final\") and at the best-validation epoch up to it")
    return out, notes




def grid_folder(what: str, name: str, grid_file: str | Path | None = None):
    """The grid's storage folder: ``what`` itself when it is one, else ``runs/grids/NAME``."""
    from orchestrator.cluster.storage import Location

    if grid_file:
        return Location.parse(str(grid_file)).parent
    if "://" in what or Path(what).is_dir():
        return Location.parse(what)
    return Location.parse("runs/grids") / name
