"""``mergenet report GRID_OR_EXPERIMENT``: compare pairs across arms and seeds.

Reads the trials (MLflow child runs) of a grid's latest submission and writes

- ``trials.parquet``: one row per trial — its ids (run, parent run, Tune trial), start and end
  time (UTC), git sha, ``config_hash``, its summary metrics, every config parameter as a column
  (``hp.*`` for the search axes, ``param.*`` for the rest; numbers and booleans as such) and its
  per-seed gain over each baseline arm in points (``gain_vs_<arm>/<metric>``; the gain over
  the main baseline is logged under the same name to the trial's MLflow run);
- ``history.parquet``: one row per trial and epoch, every per-epoch metric, from the trials'
  ``metrics.jsonl`` (the grid's folder, else the run's artifact);
- ``paired.parquet``: the paired statistics (:mod:`orchestrator.tracking.paired`) — per pair × arm,
  the mean difference to the baseline arm at the same seed with a 95 % Student-t interval,
  ``n`` and whether the interval excludes 0, the minimum detectable effect (``mde``, power 0.8)
  and the seeds needed to detect ``--effect`` points (``n_needed``); final epoch and
  best-validation epoch; against ``alone`` by default and against every ``--control`` arm;
- ``report.md``: the pair × arm table (mean ± std) and the paired tables;
- ``forest.png`` (and ``forest.json``, what it drew): the verdicts' numbers as a forest plot
  (:mod:`orchestrator.tracking.figures`); ``curves_<pair>.png``: per pair, every arm's learning
  curves with seed bands;

logs them and the paired numbers (as metrics, in points) to the submission's parent run, writes
the verdicts and links to the pictures into its description, and logs each trial's gain over
the baseline (points, step 0) to its child run. ``--results-md`` writes the same tables as a
named section of a Markdown file (``docs/RESULTS.md``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from mergenet_core.errors import MergenetError
from orchestrator.tracking import figures, paired
from orchestrator import tracking

METRICS = tuple(paired.METRICS.values())


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
        from orchestrator.grid.config import load_grid

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


def trials_frame(c, experiment_id: str, parent: str | None) -> pd.DataFrame:
    """One row per trial: ids, pair, arm (the grid's ``methods`` key), method, seed, status, its
    end's tags (``failure_reason``; ``stopped_by``, ``stopped_at``: the last epoch of a trial a
    scheduler stopped early), every metric, and every parameter (``hp.*`` search axes as logged,
    the rest as ``param.*``)."""
    flt = f"tags.`{tracking.TRIAL_TAG}` = '1'"
    if parent:
        flt += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = c.search_runs([experiment_id], flt, max_results=10000)
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


DIAGNOSTICS = (("write_change", "write change"), ("receiver_factor_cos", "receiver factor cos"),
               ("provider_factor_cos", "provider factor cos"),
               ("feedback_cos", "feedback cos (vs task gradient)"), ("source_cos", "cos(written, source)"),
               ("gate", "gate"))
#: per-epoch numbers of the method as a whole (columns after the per-link ones)
METHOD_DIAGNOSTICS = (("adapter/grad_norm", "adapter grad norm", ".3g"),
                      ("adapter/update_ratio", "adapter update / weight", ".2e"))


def diagnostics_markdown(df: pd.DataFrame) -> str | None:
    """Per pair × arm with transfer diagnostics: the last epoch's per-link means (``transfer/L/*``:
    relative size of each write, row cosine of consecutive factors, cosine of the adapter's
    feedback with the task gradient dL/dA') and the adapter's gradient norm and update-to-weight
    ratio, averaged over seeds; ``None`` when no arm has them."""
    done = df[df["status"] == "FINISHED"]
    links = sorted({c.split("/")[1] for c in df.columns if c.startswith("transfer/") and c.count("/") == 2})
    if not links:
        return None
    head = ["pair", "arm", "link"] + [t for _, t in DIAGNOSTICS] + [t for _, t, _ in METHOD_DIAGNOSTICS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (pair, arm), g in done.groupby(["pair", "arm"], sort=True):
        for link in links:
            cols = [f"transfer/{link}/{k}" for k, _ in DIAGNOSTICS]
            if not any(c in g and g[c].notna().any() for c in cols):
                continue
            cells = [f"{g[c].mean():.3f}" if c in g and g[c].notna().any() else "–" for c in cols]
            cells += [format(g[c].mean(), f) if c in g and g[c].notna().any() else "–"
                      for c, _, f in METHOD_DIAGNOSTICS]
            lines.append(f"| {pair} | {arm} | {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None


def _fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * (0 if pd.isna(std) else std):.2f}"


def _config(df: pd.DataFrame) -> pd.Series:
    """``arm`` or ``arm (lr=…)`` when the grid has search axes."""
    cols = paired.hp_columns(df)
    if not cols:
        return df["arm"]
    return df.apply(lambda r: f"{r['arm']} ({paired.hp_label(r, cols)})" if paired.hp_label(r, cols)
                    else r["arm"], axis=1)


def pair_labels(df: pd.DataFrame) -> dict[str, str]:
    """pair name -> ``name (source → target)``."""
    out = {}
    for pair, g in df.groupby("pair"):
        src = g["source"].dropna()
        src = next((s for s in src if s != "-"), "-")
        out[pair] = f"{pair} ({src} → {g['target'].iloc[0]})"
    return out


def markdown_table(df: pd.DataFrame, metric: str, baseline: str = "alone") -> str:
    """pair × arm: mean ± sample std over seeds (n = seeds), in %."""
    done = df[df["status"] == "FINISHED"].dropna(subset=[metric]).copy()
    done["config"] = _config(done)
    configs = sorted(done["config"].unique(), key=lambda m: (not m.startswith(baseline), m))
    labels = pair_labels(df)
    lines = ["| pair (source → target) | " + " | ".join(configs) + " |", "|---" * (1 + len(configs)) + "|"]
    for pair, g in done.groupby("pair", sort=True):
        cells = []
        for m in configs:
            s = g[g["config"] == m][metric].agg(["mean", "std", "count"])
            cells.append(f"{_fmt(s['mean'], s['std'])} (n={int(s['count'])})" if s["count"] else "–")
        lines.append(f"| {labels[pair]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_markdown(table: pd.DataFrame, labels: dict[str, str]) -> str:
    """One row per pair × arm: n, mean Δ with 95 % CI and whether it excludes 0, for the final
    and the best-validation epoch; the minimum detectable effect (power 0.8) and the seeds
    needed for the table's ``effect``, final / best-val; and the per-seed Δ at the final epoch
    (points)."""
    if table.empty:
        return "_no arm shares a seed with the baseline (nothing to pair)_"
    effect = float(table["effect"].iloc[0]) if "effect" in table else paired.EFFECT
    power = float(table["power"].iloc[0]) if "power" in table else paired.POWER
    pts = f"{100 * effect:g} point" + ("" if round(100 * effect, 9) == 1 else "s")
    lines = ["| pair (source → target) | arm | n | Δ final [95 % CI] | CI excludes 0 (final) | "
             "Δ best-val [95 % CI] | CI excludes 0 (best-val) | "
             f"MDE at power {power:g}, final / best-val | seeds for {pts}, final / best-val | "
             "per-seed Δ final (seed: Δ) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = ["pair", "arm", "hp"]
    for (pair, arm, hp), g in table.groupby(keys, sort=False):
        by = {r["epoch"]: r for _, r in g.iterrows()}
        f, b = by.get("final"), by.get("best_val")

        def cell(r):
            if r is None:
                return "–", "–"
            return paired.fmt_diff(r), paired.verdict(r)

        def power_cells(r):
            if r is None:
                return "–", "–"
            return paired.fmt_mde(r.get("mde", float("nan"))), paired.fmt_n(r.get("n_needed", float("nan")))

        fc, fv = cell(f)
        bc, bv = cell(b)
        (fm, fn), (bm, bn) = power_cells(f), power_cells(b)
        n = (f if f is not None else b)["n"]
        seeds = ", ".join(f"{s}: {paired.fmt_points(d)}" for s, d in zip(f["seeds"], f["diffs"])) if f is not None else "–"
        name = f"{arm} ({hp})" if hp else arm
        lines.append(f"| {labels.get(pair, pair)} | {name} | {n} | {fc} | {fv} | {bc} | {bv} | {fm} / {bm} | "
                     f"{fn} / {bn} | {seeds} |")
    return "\n".join(lines)


def _metric_key(*parts: str) -> str:
    """An MLflow-safe metric key (letters, digits, ``_ - . / : space``)."""
    return "/".join(re.sub(r"[^\w.\- :]", "_", p) for p in parts if p)


def log_paired(c, parent: str, table: pd.DataFrame) -> None:
    """The paired numbers as parent-run metrics, in points rounded to 0.001 (the report's unit):
    ``paired/<arm>_vs_<baseline>/<pair>[/<hp>]/<final|best_val>/<mean_diff|ci_low|ci_high|n|excludes_zero|mde|n_needed>``
    (``excludes_zero`` 1/0, absent when n < 2, like ``mde`` and ``n_needed``; ``n_needed`` also
    when beyond :data:`paired.N_MAX`)."""
    metrics = {}
    for _, r in table.iterrows():
        base = _metric_key("paired", f"{r['arm']}_vs_{r['baseline']}", r["pair"], r["hp"].replace(", ", "_"),
                           r["epoch"])
        metrics[f"{base}/n"] = r["n"]
        for k in ("mean_diff", "ci_low", "ci_high", "mde"):
            if k in r and not pd.isna(r[k]) and abs(r[k]) != float("inf"):
                metrics[f"{base}/{k}"] = round(100 * r[k], 3)
        if "n_needed" in r and not pd.isna(r["n_needed"]) and r["n_needed"] != float("inf"):
            metrics[f"{base}/n_needed"] = r["n_needed"]
        if r["excludes_zero"] is not None:
            metrics[f"{base}/excludes_zero"] = int(bool(r["excludes_zero"]))
    tracking.log_metrics(c, parent, metrics, step=0)


def log_trial_gains(c, df: pd.DataFrame, baseline: str) -> None:
    """Each trial's own gain over the baseline at its seed, in points, on its child run at step
    0 (:func:`paired.gain_column`: ``gain_vs_<baseline>/final_test_acc`` and
    ``gain_vs_<baseline>/test_acc_at_best_val``; skipped when the run already holds the value)."""
    todo = []
    for _, r in df.iterrows():
        out = {}
        for metric in METRICS:
            key = paired.gain_column(baseline, metric)
            v = r.get(key)
            if v is not None and not pd.isna(v) and r.get(f"logged/{key}") != v:
                out[key] = float(v)
        if out:
            todo.append((r["run_id"], out))
    # one write per trial: over HTTP (a tracking server) 8 at a time, which is what keeps the
    # report of 1,000 trials within its 30 s (benchmarks/bench_grid_scale.py); sqlite one by one
    threads = 8 if c.tracking_uri.startswith(("http://", "https://")) else 1
    if threads == 1:
        for run_id, out in todo:
            tracking.log_metrics(c, run_id, out, step=0)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda t: tracking.log_metrics(c, t[0], t[1], step=0), todo))


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


#: below MLflow's 8,000-character cap on a tag's value (``mlflow.note.content``)
DESCRIPTION_MAX = 7500


def description(name: str, experiment_id: str, parent: str, verdicts: list[dict], positive: list[dict],
                pictures: list[str], finished: int, total: int) -> str:
    """The parent run's description (Markdown in the UI): the verdicts, the positive controls and
    links to the report and its pictures."""
    from orchestrator.tracking.view import run_url

    lines = [f"**{name}**: {finished} finished / {total} trials. "
             f"[report.md]({run_url(experiment_id, parent, 'report/report.md')})"
             + "".join(f" · [{p}]({run_url(experiment_id, parent, 'report/' + p)})" for p in pictures)]
    if positive:
        lines += ["", "Positive controls (best-validation epoch, points):", *paired.positive_control_lines(positive)]
    if verdicts:
        lines += ["", "Verdicts (best-validation epoch, points):", *paired.verdict_lines(verdicts)]
    text = "\n".join(lines)
    if len(text) > DESCRIPTION_MAX:  # MLflow caps a tag's value: the rest is in report.md
        text = text[:DESCRIPTION_MAX - 80].rsplit("\n", 1)[0] + "\n\n… (cut: the whole list is in report.md)"
    return text


def report_safe(name: str) -> str:
    """A pair's name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def section_name(title: str) -> str:
    """The marker name of a section: ``Study: image`` -> ``study-image``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "report"


def write_section(path: str | Path, title: str, body: str) -> str:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in ``path``
    (NAME from ``title``) with ``## title`` and ``body``; append the section when it is
    missing, create the file when it does not exist. Returns NAME."""
    path = Path(path)
    name = section_name(title)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Results\n"
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return name


def report_sections(df: pd.DataFrame, tables: dict[str, pd.DataFrame], level: int = 2,
                    verdicts: list[dict] | None = None, positive: list[dict] | None = None,
                    console: bool = False, score: str = "accuracy") -> list[str]:
    """The Markdown body: positive controls and verdicts (when asked for), arm means, then one
    paired table per comparison. ``console``: what ``mergenet run`` prints -- without the
    final-epoch accuracies and the transfer diagnostics, which only the file has. ``score``: what
    the targets' ``acc`` is (:func:`score_name`)."""
    h = "#" * level
    labels = pair_labels(df)
    baseline = next(iter(tables), "alone")
    parts = []
    if positive:
        parts += [f"\n{h} Can this setting see a known effect? (positive controls)\n",
                  f"Each positive control's gain over `{baseline}` at the best-validation epoch (points, mean "
                  "paired difference, 95 % interval). Where none is *shown*, the setting cannot show transfer "
                  "and its verdicts read *cannot measure*.\n",
                  *paired.positive_control_lines(positive), ""]
    if verdicts:
        parts += [f"\n{h} Verdict\n",
                  f"On the target test {score} at each run's best-validation epoch (points, mean paired "
                  "difference with its 95 % interval), all three comparisons of a verdict on one seed set: the "
                  f"seeds where the arm, `{baseline}` and the control all finished (the others are listed with "
                  "why; an arm that failed where the other two finished is named in the verdict). *Transfer "
                  f"shown*: the interval lies above 0 both against `{baseline}` and against the arm's negative "
                  f"control; *harmful*: the interval against `{baseline}` lies below 0; *{paired.UNDETERMINED}*: "
                  "every seed gave the same difference in a comparison that decides, so there is no interval; "
                  f"otherwise *not shown*. *Detectable*: the smallest true gain over `{baseline}` the paired "
                  "t-test finds with probability 0.8 at these seeds and this seed-to-seed sd (minimum "
                  "detectable effect); *rules out gains above*: the upper end of the interval.\n",
                  *paired.verdict_lines(verdicts), ""]
    if paired.hp_columns(df) and "target/best_val_acc" in df:
        parts += [f"\n{h} Best validation {score} (choose hyperparameters here, never on test)\n",
                  f"Target {score} on the validation split at each run's best-validation epoch, in %, "
                  "mean ± sample std over seeds, per arm and search-axis value.\n",
                  markdown_table(df, "target/best_val_acc", baseline), ""]
    for metric, title in ((METRICS[0], f"Target test {score} at the final epoch"),
                          (METRICS[1], f"Target test {score} at the best-validation epoch")):
        if metric in df and not (console and metric == METRICS[0]):
            parts += [f"\n{h} {title}\n", f"{score[0].upper() + score[1:]} in %, mean ± sample std over seeds (n = seeds).\n",
                      markdown_table(df, metric, baseline), ""]
    if not tables:
        parts += [f"\n_No `{baseline}` arm: no paired differences._\n"]
    diag = None if console else diagnostics_markdown(df)
    if diag:
        parts += [f"\n{h} Transfer diagnostics (last epoch, mean over seeds)\n",
                  "Per link: *write change* = ‖W_after − W_before‖ / ‖W_before‖ of each write into the target "
                  "layer; *factor cos* = mean row cosine between consecutive transfers' factors; *feedback cos* = "
                  "cosine of the feedback the adapter learned from with the target's task gradient dL/dA' (1 for "
                  "the exact rule; the delta rule's drift from it); *cos(written, source)* = cosine of the written "
                  "matrix with the source matrix the adapter saw (same shapes only: does the output move toward "
                  "the source?); *gate* = the residual gate's value (gated adapters); the adapter's pre-clip "
                  "gradient norm and its update-to-weight ratio per update.\n", diag, ""]
    for base, table in tables.items():
        parts += [f"\n{h} Paired differences to `{base}` (same seed)\n",
                  f"Δ = arm − `{base}` at the same pair and seed (same data subset, initialisation and batch "
                  f"order), target test {score} in points; mean over seeds with a 95 % Student-t interval "
                  f"(n − 1 degrees of freedom). \"best-val\": test {score} at each run's best-validation epoch. "
                  "MDE: the minimum detectable effect, the smallest true Δ the two-sided paired t-test (α = 0.05) "
                  "finds with probability 0.8 at this n and sd (noncentral t); seeds for E points: the n "
                  "that finds a true Δ of E points with probability 0.8 at this sd (– where n < 2, and where "
                  f"every seed's Δ is the same: *{paired.UNDETERMINED}*, no interval).\n",
                  paired_markdown(table, labels), ""]
    return parts


RUN_ACCOUNT = "run_account.md"


def _grid_folder(what: str, name: str, grid_file: str | Path | None = None):
    """The grid's storage folder: ``what`` itself when it is one, else ``runs/grids/NAME``."""
    from orchestrator.cluster.storage import Location

    if grid_file:
        return Location.parse(str(grid_file)).parent
    if "://" in what or Path(what).is_dir():
        return Location.parse(what)
    return Location.parse("runs/grids") / name


def make_report(what: str, out_dir: str | Path | None = None, baseline: str = "alone",
                controls: list[str] | tuple[str, ...] = (), results_md: str | Path | None = None,
                section: str | None = None, verdict: list[tuple[str, str]] | tuple = (),
                grid_file: str | Path | None = None, effect: float = 1.0,
                positive: list[str] | tuple[str, ...] = (), preamble: str | None = None) -> dict:
    """``verdict``: ``(arm, control)`` pairs that get a one-line transfer verdict per pair;
    ``positive``: positive-control arms (their gain over ``baseline`` must be shown for a pair's
    verdicts to count);
    ``effect``: the true gain, in points, the paired tables' "seeds needed" are for (> 0);
    ``preamble``: Markdown put after the intro (``mergenet run``'s wall times and search; by
    default what the last ``mergenet run`` of the grid wrote to ``run_account.md`` in its folder)."""
    if not (isinstance(effect, (int, float)) and effect > 0 and effect != float("inf")):
        raise MergenetError(f"report: --effect must be a positive number of points, not {effect}")
    eff = effect / 100
    c = tracking.existing_client()  # reading: never creates an empty mlflow.db
    experiment_id, name, parent = resolve_experiment(c, what)
    df = trials_frame(c, experiment_id, parent)
    folder = _grid_folder(what, name, grid_file)
    history = history_frame(c, df, folder)
    score = score_name(stored_grid(name, grid_file))
    df, stops = at_common_epoch(c, df, folder, history, score)
    arms = set(df["arm"])
    # a grid without `alone` still gets its means table; an arm asked for by name must exist
    for a in (((baseline,) if baseline != "alone" else ()) + tuple(controls) + tuple(positive)
              + tuple(x for v in verdict for x in v)):
        if a not in arms:
            raise MergenetError(f"report: no arm '{a}' in grid {name} (arms: {', '.join(sorted(arms))})")
    out = Path(out_dir or Path("runs") / "reports" / name)
    out.mkdir(parents=True, exist_ok=True)

    tables = {baseline: paired.paired_table(df, baseline, effect=eff)} if baseline in arms else {}
    for ctl in controls:
        tables[ctl] = paired.paired_table(df, ctl, arms=[a for a in sorted(arms) if a not in (baseline, ctl)],
                                          effect=eff)
    df = df.rename(columns={c: f"logged/{c}" for c in df.columns if c.startswith("gain_vs_")})
    for base in tables:
        df = paired.per_trial_diffs(df, base)
    table = pd.concat(tables.values(), ignore_index=True) if tables else paired.paired_table(df.iloc[0:0])

    parquet, paired_parquet, history_parquet = out / "trials.parquet", out / "paired.parquet", out / "history.parquet"
    df.drop(columns=[c for c in df.columns if c.startswith("logged/")]).to_parquet(parquet, index=False)
    table.to_parquet(paired_parquet, index=False)
    history.to_parquet(history_parquet, index=False)
    finished = int((df["status"] == "FINISHED").sum())
    intro = (f"MLflow experiment `{name}` ({experiment_id}), submission run `{parent}`; "
             f"{finished} finished / {len(df)} trials.\n")
    setting = setting_lines(c, name, parent, grid_file) + [f"- {n}" for n in stops]
    if score != "accuracy":
        setting.append(f"- the targets' accuracy columns (`acc`) read **{score}** here")
    if setting:
        intro += "\n" + "\n".join(setting) + "\n"
    if preamble is None:  # what `mergenet run` recorded of itself (wall times, the search's winner)
        acct = folder / RUN_ACCOUNT
        preamble = acct.read_text() if acct.exists() else None
    if preamble:
        intro += "\n" + preamble.strip() + "\n"
    md = out / "report.md"
    if verdict and baseline not in arms:
        raise MergenetError(f"report: --verdict needs the baseline arm '{baseline}' in grid {name}")
    pos = paired.positive_controls(df, baseline, list(positive), effect=eff) if positive and baseline in arms else []
    verdicts = (paired.transfer_verdicts(df, baseline, list(verdict), effect=eff, positive=pos, gated=bool(positive))
                if verdict else [])
    labels = pair_labels(df)
    # the pictures: the verdicts' numbers (best-validation epoch), the learning curves per pair
    rows = figures.forest_rows(tables, verdicts, pos, labels)
    forest = figures.forest_plot(rows, out / figures.FOREST,
                                 f"{name}: each arm against `{baseline}` and against its control, same seed",
                                 score=score)
    (out / "forest.json").write_text(json.dumps(rows, indent=1, default=float))
    curves = {}
    for pair in sorted(labels):
        png, _ = figures.learning_curves(history[history["status"] == "FINISHED"], pair, labels[pair],
                                         out / f"curves_{report_safe(pair)}.png", score=score)
        if png is not None:
            curves[pair] = png
    pictures = ([forest.name] if forest else []) + [p.name for p in curves.values()]
    md.write_text("\n".join([f"# {name}: pair × arm\n", intro,
                             *([f"![forest plot]({forest.name})\n"] if forest else []),
                             *report_sections(df, tables, verdicts=verdicts, positive=pos, score=score),
                             *(f"\n![learning curves, {p}]({png.name})" for p, png in curves.items())]) + "\n")
    if results_md:
        body = "\n".join([intro, *report_sections(df, tables, level=3, verdicts=verdicts, positive=pos, score=score)])
        write_section(results_md, section or name, body)
    if parent:
        for f in (parquet, paired_parquet, history_parquet, md, forest, out / "forest.json", *curves.values()):
            if f is not None:
                c.log_artifact(parent, str(f), artifact_path="report")
        log_paired(c, parent, table)
        c.set_tag(parent, "mlflow.note.content",
                  description(name, experiment_id, parent, verdicts, pos, pictures, finished, len(df)))
    log_trial_gains(c, df, baseline)
    console = "\n".join([f"# {name}: pair × arm\n", intro,
                         *report_sections(df, tables, verdicts=verdicts, positive=pos, console=True, score=score),
                         f"(final-epoch accuracies and transfer diagnostics: {md})"])
    return {"markdown": md, "parquet": parquet, "paired": paired_parquet, "history": history_parquet,
            "forest": forest, "forest_rows": rows, "curves": curves, "text": md.read_text(),
            "console": console,
            "tables": tables,
            "verdicts": [{k: v[k] for k in ("pair", "arm", "control", "verdict", "word", "mde", "rules_out_above",
                                            "seeds", "left_out", "arm_failed")}
                         for v in verdicts],
            "positive_controls": [{k: v[k] for k in ("pair", "arm", "baseline", "shown")} for v in pos]}
