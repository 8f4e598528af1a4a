"""Paired statistics over seeds: each arm against a baseline arm at the same seed.

Two trials at the same pair and seed share the data subset, the initialisation and the batch
order, so the comparison that removes seed-to-seed noise is the per-seed difference
``arm(seed) − baseline(seed)``. Over the ``n`` seeds both arms finished, the mean difference
gets a two-sided 95 % confidence interval from Student's t with ``n − 1`` degrees of freedom;
an interval that excludes 0 is the only "gain" (or "loss") the report calls shown.

Trials are rows of the report's trial table (``pair``, ``arm``, ``seed``, ``status``, the
metric columns, and ``hp.*`` columns when a grid has search axes). A trial of a grid with search
axes is paired with the baseline trial at the same seed *and* the same ``hp.*`` values; when the
baseline arm has exactly one trial per seed (its hyperparameters do not vary), that trial.
"""
from __future__ import annotations

import math

import pandas as pd

#: the two metrics the report compares: final epoch, and the epoch with the best validation accuracy
METRICS = {"final": "target/final_test_acc", "best_val": "target/test_acc_at_best_val"}

COLUMNS = ["pair", "arm", "hp", "baseline", "epoch", "metric", "n", "seeds", "diffs", "arm_mean", "baseline_mean",
           "mean_diff", "sd_diff", "ci_low", "ci_high", "excludes_zero"]


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, sample sd, low, high)`` of a two-sided Student-t interval for the mean of
    ``diffs``; with fewer than 2 values the sd and the bounds are NaN."""
    from scipy import stats

    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def excludes_zero(low: float, high: float) -> bool | None:
    """True/False when the interval exists, None when it does not (n < 2)."""
    if math.isnan(low) or math.isnan(high):
        return None
    return bool(low > 0 or high < 0)


def hp_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("hp."))


def hp_label(row: pd.Series | dict, cols: list[str]) -> str:
    """``lr=0.001, rank=4``: the search-axis values of a trial (last dotted component)."""
    return ", ".join(f"{c.split('.')[-1]}={row[c]}" for c in cols if not pd.isna(row[c]))


def _done(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    if metric not in df:
        return df.iloc[0:0]
    return df[(df["status"] == "FINISHED") & df[metric].notna()]


def _baseline_by_seed(base: pd.DataFrame, row_hp: dict, cols: list[str], metric: str) -> dict[int, float] | None:
    """seed -> the baseline's value for a group with hyperparameters ``row_hp``; None when the
    baseline cannot be matched unambiguously."""
    if cols:
        same = base
        for c in cols:
            v = row_hp.get(c)
            same = same[same[c].isna()] if pd.isna(v) else same[same[c] == v]
        if len(same) and not same["seed"].duplicated().any():
            return dict(zip(same["seed"], same[metric]))
    if base["seed"].duplicated().any():
        return None
    return dict(zip(base["seed"], base[metric]))


def paired_table(df: pd.DataFrame, baseline: str = "alone", arms: list[str] | None = None) -> pd.DataFrame:
    """One row per pair × arm (× hyperparameter setting) × epoch kind (``final``, ``best_val``):
    the per-seed differences to ``baseline`` at the same seed, their mean, sample sd, 95 %
    t-interval, ``n`` and whether the interval excludes 0. Differences are in accuracy units
    (fractions), like the metrics. Arms without a matched baseline seed get n = 0."""
    cols = hp_columns(df)
    rows = []
    for kind, metric in METRICS.items():
        done = _done(df, metric)
        for pair, g in done.groupby("pair", sort=True):
            base = g[g["arm"] == baseline]
            if base.empty:
                continue
            present = list(dict.fromkeys(g["arm"]))  # in the frame's order (the report's: by arm name)
            for arm in (arms if arms is not None else present):
                if arm == baseline or arm not in present:
                    continue
                a = g[g["arm"] == arm]
                groups = a.groupby(cols, dropna=False, sort=True) if cols else [((), a)]
                for _, ga in groups:
                    hp = {c: ga.iloc[0][c] for c in cols}
                    by_seed = _baseline_by_seed(base, hp, cols, metric)
                    if by_seed is None:
                        continue
                    ga = ga[ga["seed"].isin(list(by_seed))].sort_values("seed")
                    seeds = [int(s) for s in ga["seed"]]
                    diffs = [float(v) - float(by_seed[s]) for s, v in zip(seeds, ga[metric])]
                    mean, sd, low, high = t_interval(diffs)
                    rows.append({
                        "pair": pair, "arm": arm, "hp": hp_label(hp, cols), "baseline": baseline, "epoch": kind,
                        "metric": metric, "n": len(diffs), "seeds": seeds, "diffs": diffs,
                        "arm_mean": float(ga[metric].mean()) if len(ga) else math.nan,
                        "baseline_mean": float(sum(by_seed[s] for s in seeds) / len(seeds)) if seeds else math.nan,
                        "mean_diff": mean, "sd_diff": sd, "ci_low": low, "ci_high": high,
                        "excludes_zero": excludes_zero(low, high)})
    # object: True / False, or None where there is no interval (n < 2)
    return pd.DataFrame(rows, columns=COLUMNS).astype({"excludes_zero": object})


def per_trial_diffs(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """``df`` plus, per metric, the trial's difference to ``baseline`` at the same seed (and the
    same ``hp.*`` values when the baseline has them): columns ``diff_vs_<baseline>/<metric>``."""
    out = df.copy()
    cols = hp_columns(df)
    for metric in METRICS.values():
        col = f"diff_vs_{baseline}/{metric}"
        out[col] = math.nan
        done = _done(df, metric)
        for pair, g in done.groupby("pair"):
            base = g[g["arm"] == baseline]
            if base.empty:
                continue
            for idx, row in g[g["arm"] != baseline].iterrows():
                by_seed = _baseline_by_seed(base, {c: row[c] for c in cols}, cols, metric)
                if by_seed and row["seed"] in by_seed:
                    out.loc[idx, col] = float(row[metric]) - float(by_seed[row["seed"]])
    return out


def fmt_points(x: float) -> str:
    """An accuracy difference as signed points (``+1.23``), ``–`` when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}"


def fmt_ci(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "– (n < 2)"
    return f"[{100 * low:+.2f}, {100 * high:+.2f}]"


def verdict(excl: bool | None, mean: float) -> str:
    if excl is None:
        return "n < 2"
    if not excl:
        return "no (CI includes 0)"
    return "yes, above 0" if mean > 0 else "yes, below 0"


def transfer_verdicts(df: pd.DataFrame, baseline: str, checks: list[tuple[str, str]]) -> list[dict]:
    """For each ``(arm, control)`` and pair, on the test accuracy at the best-validation epoch (the
    primary number; never selected on test): ``transfer shown`` when the arm's 95 % interval
    against ``baseline`` and against ``control`` both lie above 0; ``harmful`` when its interval
    against ``baseline`` lies below 0; ``not shown`` otherwise (or without intervals)."""
    out = []
    for arm, control in checks:
        vs_base = paired_table(df, baseline, arms=[arm])
        vs_ctl = paired_table(df, control, arms=[arm])
        ctl_base = paired_table(df, baseline, arms=[control])
        keys = sorted({(p, h) for t in (vs_base, vs_ctl) for p, h in zip(t["pair"], t["hp"])})
        for pair, hp in keys:
            def row(t, hp=hp):  # the same pair and the same search-axis values
                r = t[(t["pair"] == pair) & (t["epoch"] == "best_val")]
                same = r[r["hp"] == hp]
                r = same if len(same) else r[r["hp"] == ""] if (r["hp"] == "").any() else same
                return r.iloc[0] if len(r) else None
            b, c, cb = row(vs_base), row(vs_ctl), row(ctl_base)
            if b is None or c is None or b["excludes_zero"] is None or c["excludes_zero"] is None:
                word = "not shown (too few paired seeds)"
            elif b["ci_high"] < 0:
                word = "harmful"
            elif b["ci_low"] > 0 and c["ci_low"] > 0:
                word = "transfer shown"
            else:
                word = "not shown"
            out.append({"pair": pair if not hp else f"{pair} ({hp})", "arm": arm, "control": control,
                        "baseline": baseline, "verdict": word,
                        "vs_baseline": b, "vs_control": c, "control_vs_baseline": cb})
    return out


def verdict_lines(verdicts: list[dict]) -> list[str]:
    """One Markdown bullet per (pair, arm): the verdict and the intervals behind it."""
    lines = []
    for v in verdicts:
        def part(r, what):
            if r is None:
                return f"{what}: –"
            return f"{what} {fmt_points(r['mean_diff'])} {fmt_ci(r['ci_low'], r['ci_high'])} (n = {r['n']})"
        lines.append(f"- **{v['pair']} · {v['arm']}: {v['verdict']}** — "
                     + "; ".join([part(v["vs_baseline"], f"vs `{v['baseline']}`"),
                                  part(v["vs_control"], f"vs `{v['control']}`"),
                                  part(v["control_vs_baseline"], f"control `{v['control']}` vs `{v['baseline']}`")]))
    return lines
