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

Four steps, each a module that can be tested alone: read the records (:mod:`.records`), compute
the paired statistics (:mod:`.paired`), render them (:mod:`.render`, :mod:`.figures`), publish them
(:mod:`.publish`). This module only joins them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mergenet_core.errors import MergenetError
from orchestrator import tracking
from orchestrator.tracking import figures, paired, publish, records, render
from orchestrator.tracking import verdicts as vd


@dataclass
class Records:
    """What the report reads: the submission's trials (one row each) and their histories."""

    name: str
    experiment_id: str
    parent: str | None
    df: pd.DataFrame
    history: pd.DataFrame
    folder: object
    score: str
    notes: list[str]


@dataclass
class Stats:
    """What the report computes: the paired tables per baseline, the verdicts, the positive controls."""

    tables: dict[str, pd.DataFrame]
    table: pd.DataFrame
    verdicts: list[dict] = field(default_factory=list)
    positive: list[dict] = field(default_factory=list)


def read(c, what: str, grid_file=None, page_size: int = tracking.PAGE_SIZE) -> Records:
    """Step 1: the trials of the grid's latest submission, their histories, compared at a common
    epoch where a scheduler stopped some early."""
    experiment_id, name, parent = records.resolve_experiment(c, what)
    df = records.trials_frame(c, experiment_id, parent, page_size=page_size)
    folder = records.grid_folder(what, name, grid_file)
    history = records.history_frame(c, df, folder)
    score = records.score_name(records.stored_grid(name, grid_file))
    df, notes = records.at_common_epoch(c, df, folder, history, score)
    return Records(name, experiment_id, parent, df, history, folder, score, notes)


def _check_arms(rec: Records, baseline: str, controls, positive, verdict) -> None:
    """An arm asked for by name must exist (a grid without ``alone`` still gets its means table)."""
    arms = set(rec.df["arm"])
    for a in (((baseline,) if baseline != "alone" else ()) + tuple(controls) + tuple(positive)
              + tuple(x for v in verdict for x in v)):
        if a not in arms:
            raise MergenetError(f"report: no arm '{a}' in grid {rec.name} (arms: {', '.join(sorted(arms))})")
    if verdict and baseline not in arms:
        raise MergenetError(f"report: --verdict needs the baseline arm '{baseline}' in grid {rec.name}")


def compute(rec: Records, baseline: str, controls, positive, verdict, eff: float) -> Stats:
    """Step 2: the paired tables (against ``baseline`` and each control), each trial's own
    differences (added to ``rec.df``), the positive controls and the verdicts."""
    arms = set(rec.df["arm"])
    tables = {baseline: paired.paired_table(rec.df, baseline, effect=eff)} if baseline in arms else {}
    for ctl in controls:
        tables[ctl] = paired.paired_table(rec.df, ctl, arms=[a for a in sorted(arms) if a not in (baseline, ctl)],
                                          effect=eff)
    df = rec.df.rename(columns={c: f"logged/{c}" for c in rec.df.columns if c.startswith("gain_vs_")})
    for base in tables:
        df = paired.per_trial_diffs(df, base)
    rec.df = df
    table = pd.concat(tables.values(), ignore_index=True) if tables else paired.paired_table(df.iloc[0:0])
    pos = vd.positive_controls(df, baseline, list(positive), effect=eff) if positive and baseline in arms else []
    verdicts = (vd.transfer_verdicts(df, baseline, list(verdict), effect=eff, positive=pos, gated=bool(positive))
                if verdict else [])
    return Stats(tables, table, verdicts, pos)


def _intro(c, rec: Records, grid_file, preamble: str | None) -> str:
    finished = int((rec.df["status"] == "FINISHED").sum())
    intro = (f"MLflow experiment `{rec.name}` ({rec.experiment_id}), submission run `{rec.parent}`; "
             f"{finished} finished / {len(rec.df)} trials.\n")
    setting = records.setting_lines(c, rec.name, rec.parent, grid_file) + [f"- {n}" for n in rec.notes]
    if rec.score != "accuracy":
        setting.append(f"- the targets' accuracy columns (`acc`) read **{rec.score}** here")
    if setting:
        intro += "\n" + "\n".join(setting) + "\n"
    if preamble is None:  # what `mergenet run` recorded of itself (wall times, the search's winner)
        acct = rec.folder / records.RUN_ACCOUNT
        preamble = acct.read_text() if acct.exists() else None
    if preamble:
        intro += "\n" + preamble.strip() + "\n"
    return intro


def write_files(rec: Records, st: Stats, out: Path, baseline: str, intro: str) -> dict:
    """Step 3 on disk: the parquet tables, the pictures and ``report.md``."""
    files = {"parquet": out / "trials.parquet", "paired": out / "paired.parquet", "history": out / "history.parquet"}
    rec.df.drop(columns=[c for c in rec.df.columns if c.startswith("logged/")]).to_parquet(files["parquet"],
                                                                                          index=False)
    st.table.to_parquet(files["paired"], index=False)
    rec.history.to_parquet(files["history"], index=False)
    labels = render.pair_labels(rec.df)
    rows = figures.forest_rows(st.tables, st.verdicts, st.positive, labels)
    forest = figures.forest_plot(rows, out / figures.FOREST,
                                 f"{rec.name}: each arm against `{baseline}` and against its control, same seed",
                                 score=rec.score)
    (out / "forest.json").write_text(json.dumps(rows, indent=1, default=float))
    curves = {}
    for pair in sorted(labels):
        png, _ = figures.learning_curves(rec.history[rec.history["status"] == "FINISHED"], pair, labels[pair],
                                         out / f"curves_{render.report_safe(pair)}.png", score=rec.score)
        if png is not None:
            curves[pair] = png
    md = out / "report.md"
    md.write_text("\n".join([f"# {rec.name}: pair × arm\n", intro,
                             *([f"![forest plot]({forest.name})\n"] if forest else []),
                             *render.report_sections(rec.df, st.tables, verdicts=st.verdicts, positive=st.positive,
                                                     score=rec.score),
                             *(f"\n![learning curves, {p}]({png.name})" for p, png in curves.items())]) + "\n")
    return {**files, "markdown": md, "forest": forest, "forest_rows": rows, "curves": curves}


def make_report(what: str, out_dir: str | Path | None = None, baseline: str = "alone",
                controls: list[str] | tuple[str, ...] = (), results_md: str | Path | None = None,
                section: str | None = None, verdict: list[tuple[str, str]] | tuple = (),
                grid_file: str | Path | None = None, effect: float = 1.0,
                positive: list[str] | tuple[str, ...] = (), preamble: str | None = None,
                page_size: int = tracking.PAGE_SIZE) -> dict:
    """``verdict``: ``(arm, control)`` pairs that get a one-line transfer verdict per pair;
    ``positive``: positive-control arms (their gain over ``baseline`` must be shown for a pair's
    verdicts to count);
    ``effect``: the true gain, in points, the paired tables' "seeds needed" are for (> 0);
    ``preamble``: Markdown put after the intro (``mergenet run``'s wall times and search; by
    default what the last ``mergenet run`` of the grid wrote to ``run_account.md`` in its folder);
    ``page_size``: trial runs per MLflow call while reading."""
    if not (isinstance(effect, (int, float)) and effect > 0 and effect != float("inf")):
        raise MergenetError(f"report: --effect must be a positive number of points, not {effect}")
    c = tracking.existing_client()  # reading: never creates an empty mlflow.db
    rec = read(c, what, grid_file, page_size)
    _check_arms(rec, baseline, controls, positive, verdict)
    out = Path(out_dir or Path("runs") / "reports" / rec.name)
    out.mkdir(parents=True, exist_ok=True)
    st = compute(rec, baseline, controls, positive, verdict, effect / 100)
    intro = _intro(c, rec, grid_file, preamble)
    res = write_files(rec, st, out, baseline, intro)
    if results_md:
        body = "\n".join([intro, *render.report_sections(rec.df, st.tables, level=3, verdicts=st.verdicts,
                                                         positive=st.positive, score=rec.score)])
        publish.write_section(results_md, section or rec.name, body)
    publish.to_mlflow(c, rec, st, res, baseline)
    console = "\n".join([f"# {rec.name}: pair × arm\n", intro,
                         *render.report_sections(rec.df, st.tables, verdicts=st.verdicts, positive=st.positive,
                                                 console=True, score=rec.score),
                         f"(final-epoch accuracies and transfer diagnostics: {res['markdown']})"])
    return {**res, "text": res["markdown"].read_text(), "console": console, "tables": st.tables,
            "verdicts": [{k: v[k] for k in ("pair", "arm", "control", "verdict", "word", "mde", "rules_out_above",
                                            "seeds", "left_out", "arm_failed")} for v in st.verdicts],
            "positive_controls": [{k: v[k] for k in ("pair", "arm", "baseline", "shown")} for v in st.positive]}
