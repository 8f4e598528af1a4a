"""Paired statistics over seeds: each arm against a baseline arm at the same seed.

Two trials at the same pair and seed share the data subset, the initialisation and the batch
order, so the comparison that removes seed-to-seed noise is the per-seed difference
``arm(seed) − baseline(seed)``. Over the ``n`` seeds both arms finished, the mean difference
gets a two-sided 95 % confidence interval from Student's t with ``n − 1`` degrees of freedom;
an interval that excludes 0 is the only "gain" (or "loss") the report calls shown.

What such an interval can show at all is the power of the same test: from the observed paired sd
and ``n``, the *minimum detectable effect* (:func:`mde_paired`: the smallest true mean difference
the two-sided paired t-test at α = 1 − level finds with probability ``power``, 0.8 by default)
and the *seeds needed* (:func:`n_needed`) to detect a given effect (1 point by default) at that
sd. Both come from the noncentral t distribution, not from the normal approximation.

Trials are rows of the report's trial table (``pair``, ``arm``, ``seed``, ``status``, the
metric columns, and ``hp.*`` columns when a grid has search axes). A trial of a grid with search
axes is paired with the baseline trial at the same seed *and* the same ``hp.*`` values; when the
baseline arm has exactly one trial per seed (its hyperparameters do not vary), that trial.

Per-seed differences that are all the same (within :data:`IDENTICAL`) have no spread to
measure: such a comparison has no interval and no power (``identical``) and reads
*undetermined (identical differences)*. Verdicts and positive controls built on these
statistics are :mod:`.verdicts`.
"""
from __future__ import annotations

import math

import pandas as pd

#: the two metrics the report compares: final epoch, and the epoch with the best validation accuracy
METRICS = {"final": "target/final_test_acc", "best_val": "target/test_acc_at_best_val"}

COLUMNS = ["pair", "arm", "hp", "baseline", "epoch", "metric", "n", "seeds", "diffs", "arm_mean", "baseline_mean",
           "mean_diff", "sd_diff", "ci_low", "ci_high", "excludes_zero", "identical", "level", "power", "mde",
           "effect", "n_needed"]

#: the power every report asks for, and the default effect (accuracy fraction: 1 point) for "seeds needed"
POWER = 0.8
EFFECT = 0.01
#: n_needed gives up here and returns inf
N_MAX = 1_000_000
#: per-seed differences (accuracy fractions) whose range is below this are identical: the same
#: number up to float rounding (an accuracy's own resolution is 1 / test examples)
IDENTICAL = 1e-9
#: what a comparison (and a verdict resting on it) reads when every paired difference is the same
UNDETERMINED = "undetermined (identical differences)"
TOO_FEW = "not shown (too few paired seeds)"


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


def _check_alpha_power(alpha: float, power: float | None = None) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), not {alpha}")
    if power is not None and not alpha < power < 1:
        raise ValueError(f"power must lie in (alpha, 1) = ({alpha}, 1), not {power}")


def power_paired(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample (= paired) t-test at level ``alpha`` on ``n``
    differences with true mean ``delta`` and true sd ``sd``: ``P(|T| > t_{1−α/2, n−1})`` where
    ``T`` is noncentral t with ``n − 1`` degrees of freedom and noncentrality
    ``delta·√n / sd`` (both tails, as R's ``pwr.t.test(type="one.sample")``).

    NaN when ``n < 2`` or ``sd`` is NaN; with ``sd = 0`` the test always rejects (1.0) unless
    ``delta = 0`` (then ``alpha``). ``n`` may be fractional (for solving in ``n``)."""
    from scipy import stats

    _check_alpha_power(alpha)
    if n is None or math.isnan(n) or n < 2 or sd is None or math.isnan(sd) or math.isnan(delta):
        return math.nan
    if sd < 0:
        raise ValueError(f"sd must be >= 0, not {sd}")
    if sd == 0:
        return alpha if delta == 0 else 1.0
    df = n - 1
    nc = abs(delta) * math.sqrt(n) / sd
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    # lower tail P(T < −crit) as P(T' > crit) with T' of noncentrality −nc: scipy's nct.cdf gives
    # NaN in the far lower tail (e.g. df = 1, nc > 7), its sf does not
    return min(1.0, float(stats.nct.sf(crit, df, nc)) + float(stats.nct.sf(crit, df, -nc)))


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """Minimum detectable effect of the two-sided paired t-test: the smallest true mean
    difference ``δ ≥ 0`` with ``power_paired(δ, sd, n, alpha) = power``, found with
    :func:`scipy.optimize.brentq` on ``δ / sd`` (so in the units of ``sd``).

    NaN when ``n < 2`` or ``sd`` is NaN (no sd, no power); 0 when ``sd = 0`` (every nonzero
    difference is found)."""
    from scipy.optimize import brentq

    _check_alpha_power(alpha, power)
    if n is None or math.isnan(n) or n < 2 or sd is None or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    f = lambda d: power_paired(d, 1.0, n, alpha) - power  # noqa: E731  (standardised: δ / sd)
    hi = 1.0
    while f(hi) < 0:  # power rises to 1 with d; at n = 2, power 0.8 needs d ≈ 16
        hi *= 2
        if hi > 1e6:
            return math.inf
    d = brentq(f, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return d * sd


def n_needed(effect: float, sd: float, alpha: float = 0.05, power: float = POWER, n_max: int = N_MAX) -> float:
    """Seeds needed: the smallest integer ``n ≥ 2`` with ``power_paired(effect, sd, n, alpha) ≥
    power`` (within 1e-9, so that ``n_needed(mde_paired(sd, n), sd) == n`` despite the root
    finder's rounding). Returned as a float: NaN when ``sd`` is NaN, 2 when ``sd = 0``,
    ``inf`` beyond ``n_max``. ``effect`` is a true mean difference in the units of ``sd``
    (its sign does not matter; 0 is refused)."""
    _check_alpha_power(alpha, power)
    if effect is None or math.isnan(effect) or effect == 0:
        raise ValueError(f"effect must be a nonzero difference, not {effect}")
    if sd is None or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 2.0
    ok = lambda n: power_paired(effect, sd, n, alpha) >= power - 1e-9  # noqa: E731  (rises with n)
    if ok(2):
        return 2.0
    lo, hi = 2, 4  # ok(lo) false
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > n_max:
            if ok(n_max):
                hi = n_max
                break
            return math.inf
    while hi - lo > 1:  # bisection on integers: ok(hi), not ok(lo)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return float(hi)


def excludes_zero(low: float, high: float) -> bool | None:
    """True/False when the interval exists, None when it does not (n < 2, identical differences)."""
    if math.isnan(low) or math.isnan(high):
        return None
    return bool(low > 0 or high < 0)


def identical(diffs: list[float]) -> bool:
    """At least 2 differences, all the same (within :data:`IDENTICAL`): no spread, so no interval
    and no power (a zero-width interval would call any such mean shown)."""
    return len(diffs) >= 2 and max(diffs) - min(diffs) <= IDENTICAL


def hp_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("hp."))


def hp_label(row: pd.Series | dict, cols: list[str]) -> str:
    """``lr=0.001, rank=4``: the search-axis values of a trial (last dotted component)."""
    return ", ".join(f"{c.split('.')[-1]}={row[c]}" for c in cols if not pd.isna(row[c]))


def _done(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    if metric not in df:
        return df.iloc[0:0]
    return df[(df["status"] == "FINISHED") & df[metric].notna()]


def _matching(base: pd.DataFrame, row_hp: dict, cols: list[str]) -> pd.DataFrame | None:
    """The trials of ``base`` (one arm at one pair) that pair with a trial of hyperparameters
    ``row_hp``: those with the same ``hp.*`` values, else -- the arm not searched -- all of them;
    None when that leaves more than one trial per seed (no unambiguous match)."""
    if cols:
        same = base
        for c in cols:
            v = row_hp.get(c)
            same = same[same[c].isna()] if pd.isna(v) else same[same[c] == v]
        if len(same) and not same["seed"].duplicated().any():
            return same
    return None if base["seed"].duplicated().any() else base


def _baseline_by_seed(base: pd.DataFrame, row_hp: dict, cols: list[str], metric: str) -> dict[int, float] | None:
    """seed -> the baseline's value for a group with hyperparameters ``row_hp``; None when the
    baseline cannot be matched unambiguously."""
    same = _matching(base, row_hp, cols)
    return None if same is None else dict(zip(same["seed"], same[metric]))


def paired_row(arm_by_seed: dict[int, float], base_by_seed: dict[int, float], level: float = 0.95,
               power: float = POWER, effect: float = EFFECT, **keys) -> dict:
    """One comparison over the seeds both hold: ``keys`` (``pair``, ``arm``, ``hp``,
    ``baseline``, ``epoch``, ``metric``) and the statistics of :func:`paired_table`'s rows."""
    alpha = 1 - level
    seeds = sorted(int(x) for x in set(arm_by_seed) & set(base_by_seed))
    diffs = [float(arm_by_seed[x]) - float(base_by_seed[x]) for x in seeds]
    mean, sd, low, high = t_interval(diffs, level)
    same = identical(diffs)
    if same:
        low = high = math.nan
    return {**keys, "n": len(diffs), "seeds": seeds, "diffs": diffs,
            "arm_mean": sum(float(arm_by_seed[x]) for x in seeds) / len(seeds) if seeds else math.nan,
            "baseline_mean": sum(float(base_by_seed[x]) for x in seeds) / len(seeds) if seeds else math.nan,
            "mean_diff": mean, "sd_diff": sd, "ci_low": low, "ci_high": high,
            "excludes_zero": excludes_zero(low, high), "identical": same, "level": level, "power": power,
            "mde": math.nan if same else mde_paired(sd, len(diffs), alpha, power), "effect": effect,
            "n_needed": math.nan if same else n_needed(effect, sd, alpha, power)}


def paired_table(df: pd.DataFrame, baseline: str = "alone", arms: list[str] | None = None,
                 effect: float = EFFECT, level: float = 0.95, power: float = POWER) -> pd.DataFrame:
    """One row per pair × arm (× hyperparameter setting) × epoch kind (``final``, ``best_val``):
    the per-seed differences to ``baseline`` at the same seed, their mean, sample sd,
    ``level`` t-interval, ``n`` and whether the interval excludes 0; and the power of that test
    at α = 1 − ``level``: ``mde`` (:func:`mde_paired` at ``power`` from the observed sd and n)
    and ``n_needed`` (:func:`n_needed`: seeds to detect ``effect`` at ``power``), with the
    ``level``, ``power`` and ``effect`` used. Differences, ``mde`` and ``effect`` are in accuracy
    units (fractions), like the metrics. ``mde`` and ``n_needed`` are NaN where there is no sd
    (n < 2) and, like the interval, where the differences are :func:`identical` (``identical``
    True). Arms without a matched baseline seed get n = 0."""
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
                    rows.append(paired_row(dict(zip(ga["seed"], ga[metric])), by_seed, level, power, effect,
                                           pair=pair, arm=arm, hp=hp_label(hp, cols), baseline=baseline,
                                           epoch=kind, metric=metric))
    # object: True / False, or None where there is no interval (n < 2, identical differences)
    return pd.DataFrame(rows, columns=COLUMNS).astype({"excludes_zero": object})


def gain_column(baseline: str, metric: str) -> str:
    """The per-trial gain's name, the same in ``trials.parquet`` and on the MLflow child run:
    ``gain_vs_alone/test_acc_at_best_val`` (points)."""
    return f"gain_vs_{baseline}/{metric.split('/')[-1]}"


def per_trial_diffs(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """``df`` plus, per metric, the trial's difference to ``baseline`` at the same seed (and the
    same ``hp.*`` values when the baseline has them), in points: columns :func:`gain_column`."""
    out = df.copy()
    cols = hp_columns(df)
    for metric in METRICS.values():
        col = gain_column(baseline, metric)
        out[col] = math.nan
        done = _done(df, metric)
        for pair, g in done.groupby("pair"):
            base = g[g["arm"] == baseline]
            if base.empty:
                continue
            for idx, row in g[g["arm"] != baseline].iterrows():
                by_seed = _baseline_by_seed(base, {c: row[c] for c in cols}, cols, metric)
                if by_seed and row["seed"] in by_seed:
                    out.loc[idx, col] = 100 * (float(row[metric]) - float(by_seed[row["seed"]]))
    return out


def fmt_points(x: float) -> str:
    """An accuracy difference as signed points (``+1.23``), ``–`` when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}"


def fmt_ci(low: float, high: float) -> str:
    if math.isnan(low) or math.isnan(high):
        return "– (n < 2)"
    return f"[{100 * low:+.2f}, {100 * high:+.2f}]"


def fmt_diff(r) -> str:
    """A comparison's mean difference and interval in points: ``+1.23 [+0.20, +2.26]``, or its
    missing interval's reason (``– (n < 2)``, ``(identical differences)``)."""
    ci = "(identical differences)" if r.get("identical") else fmt_ci(r["ci_low"], r["ci_high"])
    return f"{fmt_points(r['mean_diff'])} {ci}"


def verdict(r) -> str:
    """Whether a comparison's interval excludes 0 (a paired table's row)."""
    if r.get("identical"):
        return UNDETERMINED
    if r["excludes_zero"] is None:
        return "n < 2"
    if not r["excludes_zero"]:
        return "no (CI includes 0)"
    return "yes, above 0" if r["mean_diff"] > 0 else "yes, below 0"


def fmt_mde(x: float) -> str:
    """A minimum detectable effect as unsigned points (``2.31``), ``–`` when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def fmt_n(x: float) -> str:
    """Seeds needed: ``12``, ``> 1000000`` beyond :data:`N_MAX`, ``–`` when missing."""
    if x is None or math.isnan(x):
        return "–"
    return f"> {N_MAX}" if math.isinf(x) else str(int(x))


