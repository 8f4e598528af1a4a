"""The report's pictures, drawn from the same numbers as its verdicts.

- :func:`forest_plot`: one row per pair × arm × comparison (against the baseline and against the
  arm's control), the mean paired difference with its 95 % interval at the verdict's epoch (the
  best-validation epoch), coloured by the verdict, 0 marked, each comparison's minimum
  detectable effect drawn as a hollow diamond and written beside the row.
- :func:`learning_curves`: per pair, each arm's target validation and test accuracy per epoch,
  the mean over seeds with a band of ± 1 sample sd, one axis.

Each returns what it drew (the rows, the curves) so that a test checks the picture's content
against the data, and the report writes it next to the PNG (``forest.json``).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from orchestrator.tracking import paired

FOREST = "forest.png"
#: verdict word (or CI state for rows without a verdict) -> colour
COLOURS = {"transfer shown": "#1a9850", "harmful": "#d73027", "not shown": "#7f7f7f",
           "cannot measure": "#e08214", paired.TOO_FEW: "#bdbdbd", paired.UNDETERMINED: "#bdbdbd",
           "above 0": "#2166ac", "below 0": "#d73027", "includes 0": "#7f7f7f", "n < 2": "#bdbdbd",
           "identical differences": "#bdbdbd",
           "positive control shown": "#2166ac", "positive control not shown": "#e08214"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ci_state(r) -> str:
    if r.get("identical"):
        return "identical differences"
    if r["excludes_zero"] is None:
        return "n < 2"
    return "includes 0" if not r["excludes_zero"] else "above 0" if r["mean_diff"] > 0 else "below 0"


def forest_rows(tables: dict[str, pd.DataFrame], verdicts: list[dict], positive: list[dict],
                labels: dict[str, str], epoch: str = "best_val") -> list[dict]:
    """The rows the forest plot draws, in order: per pair (by name), per arm, the comparison
    against the first table's baseline, then, for an arm with a verdict, against the control the
    verdict names -- a verdict's two comparisons as the verdict has them (on its one seed set).
    ``state``: the row's verdict word where a verdict covers the pair and arm (on both of its
    comparisons), the positive control's state for a positive-control arm, else where its
    interval lies. Values in points."""
    word = {(v["pair"], v["arm"]): v["word"] for v in verdicts}
    pos = {(v["pair"], v["arm"]): v["shown"] for v in positive}
    own = {(v["pair"], v["arm"]): [v["vs_baseline"], v["vs_control"]] for v in verdicts}
    rows = []
    if not tables:
        return rows
    first = next(iter(tables.values()))
    first = first[first["epoch"] == epoch].assign(key=lambda d: [p if not h else f"{p} ({h})"
                                                                 for p, h in zip(d["pair"], d["hp"])])
    for _, r in first.sort_values(["pair", "arm", "hp"], kind="stable").iterrows():
        key = (r["key"], r["arm"])
        for x in own.get(key, [r]):
            if x["n"] == 0:
                continue
            if key in word:
                state = word[key]
            elif key in pos and x["baseline"] == r["baseline"]:
                state = "positive control shown" if pos[key] else "positive control not shown"
            else:
                state = _ci_state(x)
            mde = x.get("mde", math.nan)
            rows.append({"pair": r["pair"], "label": labels.get(r["pair"], r["pair"]), "hp": r["hp"],
                         "arm": r["arm"], "baseline": x["baseline"], "epoch": epoch, "n": int(x["n"]),
                         "mean": 100 * x["mean_diff"], "low": 100 * x["ci_low"], "high": 100 * x["ci_high"],
                         "mde": 100 * mde if mde is not None and not pd.isna(mde) else math.nan,
                         "identical": bool(x.get("identical")), "state": state, "colour": COLOURS[state]})
    return rows


def forest_plot(rows: list[dict], path: Path, title: str, score: str = "accuracy") -> Path | None:
    """Draw :func:`forest_rows` (``None`` when there is nothing to compare)."""
    if not rows:
        return None
    plt = _plt()
    n = len(rows)
    height = 1.2 + 0.36 * n  # inches: the title's two lines, the rows, the axis label
    fig = plt.figure(figsize=(11, height))
    ax = fig.add_axes([0.30, 0.6 / height, 0.36, 0.36 * n / height])
    ys = list(range(n))[::-1]
    for y, r in zip(ys, rows):
        finite = not (math.isnan(r["low"]) or math.isnan(r["high"]))
        if finite:
            ax.plot([r["low"], r["high"]], [y, y], color=r["colour"], lw=2.2, solid_capstyle="butt")
        ax.plot([r["mean"]], [y], "o", color=r["colour"], ms=6)
        if not math.isnan(r["mde"]):
            ax.plot([r["mde"]], [y], "D", mfc="none", mec=r["colour"], ms=5)
        ci = paired.fmt_ci(r["low"] / 100, r["high"] / 100) if finite else (
            "[identical differences]" if r.get("identical") else "[n < 2]")
        mde = f"MDE {r['mde']:.2f}" if not math.isnan(r["mde"]) else "MDE –"
        ax.text(1.02, y, f"{r['mean']:+.2f} {ci}  n={r['n']}  {mde}  {r['state']}", transform=ax.get_yaxis_transform(),
                va="center", fontsize=7.5, color=r["colour"])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"{r['pair']}{' (' + r['hp'] + ')' if r['hp'] else ''} · {r['arm']} vs {r['baseline']}"
                       for r in rows], fontsize=7.5)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"paired difference, target test {score} at the best-validation epoch (points)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.text(0.01, 0.995, title + "\n● mean, line: 95 % t-interval over seeds, ◇: minimum detectable effect "
             "(power 0.8); colour: the verdict (green shown, red harmful, grey not shown, orange cannot measure, "
             "light grey no interval; "
             "blue: a positive control shown)", fontsize=8, va="top", wrap=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_data(history: pd.DataFrame, pair: str, metrics=("target/val_acc", "target/test_acc")) -> dict:
    """``{arm: {metric: DataFrame(epoch, mean, sd, n)}}`` over the seeds of one pair's finished
    trials (epochs without an evaluation are left out)."""
    h = history[history["pair"] == pair]
    out: dict[str, dict[str, pd.DataFrame]] = {}
    for arm, g in h.groupby("arm", sort=True):
        for m in metrics:
            if m not in g:
                continue
            s = g.dropna(subset=[m]).groupby("epoch")[m].agg(["mean", "std", "count"]).reset_index()
            if len(s):
                out.setdefault(arm, {})[m] = s.rename(columns={"std": "sd", "count": "n"})
    return out


def learning_curves(history: pd.DataFrame, pair: str, label: str, path: Path,
                    score: str = "accuracy") -> tuple[Path | None, dict]:
    """One figure for one pair: every arm's validation (solid) and test (dashed) accuracy, mean
    over seeds with a ± 1 sd band, in %."""
    data = curve_data(history, pair)
    if not data:
        return None, data
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, by) in enumerate(data.items()):
        col = colours[i % len(colours)]
        for m, style in (("target/val_acc", "-"), ("target/test_acc", "--")):
            if m not in by:
                continue
            s = by[m]
            ax.plot(s["epoch"], 100 * s["mean"], style, color=col, marker="o", ms=3,
                    label=f"{arm} {m.split('/')[-1].replace('_acc', '')} (n={int(s['n'].max())})")
            sd = 100 * s["sd"].fillna(0)
            ax.fill_between(s["epoch"], 100 * s["mean"] - sd, 100 * s["mean"] + sd, color=col, alpha=0.12, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"target {score} (%)")
    ax.set_title(f"{label}\nmean over seeds, band ± 1 sd; solid validation, dashed test", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, data


def learning_curve_png(history: list[dict], path: Path, title: str = "") -> Path:
    """Validation/test accuracy per epoch for source and target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for role, style in (("target", "-"), ("source", "--")):
        for split in ("val", "test"):
            key = f"{role}/{split}_acc"
            pts = [(r["epoch"], r[key]) for r in history if key in r]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
