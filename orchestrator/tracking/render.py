"""The report's third step: render records and statistics as Markdown (the pair × arm tables,
the paired tables, the verdicts, the transfer diagnostics, the parent run's description)."""
from __future__ import annotations

import re

import pandas as pd

from orchestrator.tracking import paired
from orchestrator.tracking import verdicts as vd

METRICS = tuple(paired.METRICS.values())


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


def report_sections(df: pd.DataFrame, tables: dict[str, pd.DataFrame], level: int = 2,
                    verdicts: list[dict] | None = None, positive: list[dict] | None = None,
                    console: bool = False, score: str = "accuracy") -> list[str]:
    """The Markdown body: positive controls and verdicts (when asked for), arm means, then one
    paired table per comparison. ``console``: what ``mergenet run`` prints -- without the
    final-epoch accuracies and the transfer diagnostics, which only the file has. ``score``: what
    the targets' ``acc`` is (:func:`score_name`)."""
    h = "#" * level
    baseline = next(iter(tables), "alone")
    parts = _verdict_sections(h, baseline, verdicts, positive, score)
    parts += _mean_sections(h, df, baseline, console, score)
    if not tables:
        parts += [f"\n_No `{baseline}` arm: no paired differences._\n"]
    diag = None if console else diagnostics_markdown(df)
    if diag:
        parts += [f"\n{h} Transfer diagnostics (last epoch, mean over seeds)\n", DIAGNOSTICS_TEXT, diag, ""]
    labels = pair_labels(df)
    for base, table in tables.items():
        parts += [f"\n{h} Paired differences to `{base}` (same seed)\n", PAIRED_TEXT.format(base=base, score=score,
                                                                                         und=paired.UNDETERMINED),
                  paired_markdown(table, labels), ""]
    return parts


DIAGNOSTICS_TEXT = (
    "Per link: *write change* = ‖W_after − W_before‖ / ‖W_before‖ of each write into the target "
    "layer; *factor cos* = mean row cosine between consecutive transfers' factors; *feedback cos* = "
    "cosine of the feedback the adapter learned from with the target's task gradient dL/dA' (1 for "
    "the exact rule; the delta rule's drift from it); *cos(written, source)* = cosine of the written "
    "matrix with the source matrix the adapter saw (same shapes only: does the output move toward "
    "the source?); *gate* = the residual gate's value (gated adapters); the adapter's pre-clip "
    "gradient norm and its update-to-weight ratio per update.\n")

PAIRED_TEXT = (
    "Δ = arm − `{base}` at the same pair and seed (same data subset, initialisation and batch "
    "order), target test {score} in points; mean over seeds with a 95 % Student-t interval "
    "(n − 1 degrees of freedom). \"best-val\": test {score} at each run's best-validation epoch. "
    "MDE: the minimum detectable effect, the smallest true Δ the two-sided paired t-test (α = 0.05) "
    "finds with probability 0.8 at this n and sd (noncentral t); seeds for E points: the n "
    "that finds a true Δ of E points with probability 0.8 at this sd (– where n < 2, and where "
    "every seed's Δ is the same: *{und}*, no interval).\n")


def _verdict_sections(h: str, baseline: str, verdicts, positive, score: str) -> list[str]:
    """The positive controls' and the verdicts' sections (when asked for)."""
    parts = []
    if positive:
        parts += [f"\n{h} Can this setting see a known effect? (positive controls)\n",
                  f"Each positive control's gain over `{baseline}` at the best-validation epoch (points, mean "
                  "paired difference, 95 % interval). Where none is *shown*, the setting cannot show transfer "
                  "and its verdicts read *cannot measure*.\n",
                  *vd.positive_control_lines(positive), ""]
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
                  *vd.verdict_lines(verdicts), ""]
    return parts


def _mean_sections(h: str, df: pd.DataFrame, baseline: str, console: bool, score: str) -> list[str]:
    """The mean ± sd tables: validation (grids with search axes), final and best-validation epoch."""
    parts = []
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
    return parts


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
        lines += ["", "Positive controls (best-validation epoch, points):", *vd.positive_control_lines(positive)]
    if verdicts:
        lines += ["", "Verdicts (best-validation epoch, points):", *vd.verdict_lines(verdicts)]
    text = "\n".join(lines)
    if len(text) > DESCRIPTION_MAX:  # MLflow caps a tag's value: the rest is in report.md
        text = text[:DESCRIPTION_MAX - 80].rsplit("\n", 1)[0] + "\n\n… (cut: the whole list is in report.md)"
    return text


def report_safe(name: str) -> str:
    """A pair's name as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
