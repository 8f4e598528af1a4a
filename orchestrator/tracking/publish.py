"""The report's last step: publish. The paired numbers and each trial's gain to MLflow, and a
named section into a Markdown file (``docs/RESULTS.md``)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from orchestrator import tracking
from orchestrator.tracking import paired, render

METRICS = tuple(paired.METRICS.values())


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


def to_mlflow(c, rec, st, files: dict, baseline: str) -> None:
    """The report's files as artifacts of the submission's parent run, the paired numbers as its
    metrics, the verdicts as its description; each trial's gain over ``baseline`` on its own run."""
    if rec.parent:
        curves = files["curves"].values()
        for f in (files["parquet"], files["paired"], files["history"], files["markdown"], files["forest"],
                  files["markdown"].parent / "forest.json", *curves):
            if f is not None:
                c.log_artifact(rec.parent, str(f), artifact_path="report")
        log_paired(c, rec.parent, st.table)
        pictures = ([files["forest"].name] if files["forest"] else []) + [p.name for p in curves]
        finished = int((rec.df["status"] == "FINISHED").sum())
        c.set_tag(rec.parent, "mlflow.note.content",
                  render.description(rec.name, rec.experiment_id, rec.parent, st.verdicts, st.positive, pictures,
                                     finished, len(rec.df)))
    log_trial_gains(c, rec.df, baseline)

