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
*undetermined (identical differences)*. A transfer verdict (:func:`transfer_verdicts`) rests
on one seed set -- where the arm, the baseline and the control all finished -- and names every
seed it leaves out with its reason.
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


def positive_controls(df: pd.DataFrame, baseline: str, arms: list[str], effect: float = EFFECT) -> list[dict]:
    """Per pair (and search point) and positive-control arm (an arm whose gain over ``baseline``
    must exist, e.g. a whole-model ``transplant`` from a trained donor): its paired row at the
    best-validation epoch and ``shown`` -- True when the 95 % interval lies above 0, None without
    an interval (too few seeds, identical differences). ``pair`` is the label (``p (lr=0.01)``),
    ``pair_name`` and ``hp`` its parts. A setting's transfer verdicts count only where one of its
    positive controls is shown (:func:`positive_gate`)."""
    out = []
    table = paired_table(df, baseline, arms=list(arms), effect=effect)
    for _, r in table[table["epoch"] == "best_val"].iterrows():
        shown = None if r["excludes_zero"] is None else bool(r["ci_low"] > 0)
        out.append({"pair": r["pair"] if not r["hp"] else f"{r['pair']} ({r['hp']})", "pair_name": r["pair"],
                    "hp": r["hp"], "arm": r["arm"], "baseline": baseline, "shown": shown, "row": r})
    return out


def positive_gate(positive: list[dict], pair: str, hp: str) -> bool | None:
    """Whether a positive control of ``pair`` is shown for a verdict at search point ``hp`` (its
    label): those at the same search point, else the pair's unsearched ones; None when the pair
    has none of them."""
    rows = [v for v in positive if v["pair_name"] == pair]
    same = [v for v in rows if v["hp"] == hp] or [v for v in rows if v["hp"] == ""]
    return any(bool(v["shown"]) for v in same) if same else None


def positive_control_lines(controls: list[dict]) -> list[str]:
    """One Markdown bullet per (pair, positive control): shown / not shown, the interval, n, MDE."""
    lines = []
    for v in controls:
        r = v["row"]
        word = {True: "shown", False: "not shown",
                None: "not shown (identical differences)" if r.get("identical") else TOO_FEW}[v["shown"]]
        lines.append(f"- **{v['pair']} · {v['arm']} vs `{v['baseline']}`: {word}** — "
                     f"{fmt_diff(r)} (n = {r['n']}, detectable ≥ {fmt_mde(r['mde'])})")
    return lines


def _why_not(rows: pd.DataFrame | None, metric: str) -> tuple[str, str] | None:
    """Why an arm gives no value at a seed: ``(kind, text)`` -- kind ``failed`` (the trial failed,
    or finished without the metric) or ``missing`` (no trial, still running, interrupted);
    None when it gives one."""
    if rows is None:
        return "missing", "several trials per seed (no unambiguous match)"
    if rows.empty:
        return "missing", "no trial"
    r = rows.iloc[0]
    if r["status"] == "FINISHED":
        if metric in r and not pd.isna(r[metric]):
            return None
        return "failed", "finished without a result"
    if r["status"] == "FAILED":
        reason = r.get("failure_reason")
        reason = reason.strip().splitlines() if isinstance(reason, str) else []
        return "failed", "FAILED" + (f" ({reason[-1][:160]})" if reason else "")
    return "missing", str(r["status"])


def _seed_values(rows: pd.DataFrame | None, metric: str) -> dict[int, float]:
    done = _done(rows, metric) if rows is not None else None
    return {} if done is None else dict(zip(done["seed"], done[metric]))


def _verdict_groups(df: pd.DataFrame, arm: str, others: tuple[str, str], cols: list[str]):
    """``(pair, hp, {arm: its trials})`` per pair and search point of ``arm``: its trials of every
    status there and the ``others``' (baseline, control) matched to them as in :func:`paired_table`."""
    for pair, g in df[df["arm"] == arm].groupby("pair", sort=True):
        at = df[df["pair"] == pair]
        for _, ga in (g.groupby(cols, dropna=False, sort=True) if cols else [((), g)]):
            hp = {c: ga.iloc[0][c] for c in cols}
            yield pair, hp_label(hp, cols), {arm: ga, **{o: _matching(at[at["arm"] == o], hp, cols) for o in others}}


def _word(b: dict, c: dict) -> str:
    """The verdict on the comparisons against the baseline (``b``) and the control (``c``), both
    on the same seeds."""
    if b["n"] < 2:
        return TOO_FEW
    if b["identical"]:
        return UNDETERMINED
    if b["ci_high"] < 0:
        return "harmful"
    if b["ci_low"] > 0:
        return UNDETERMINED if c["identical"] else "transfer shown" if c["ci_low"] > 0 else "not shown"
    return "not shown"


def _seed_list(seeds) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(str(x) for x in seeds)


def _one_verdict(pair: str, hp: str, trials: dict, baseline: str, control: str, effect: float) -> dict:
    """The verdict of the first arm of ``trials`` at one pair and search point, on the seeds
    where it, ``baseline`` and ``control`` all finished."""
    metric = METRICS["best_val"]
    arm = next(iter(trials))
    vals = {a: _seed_values(t, metric) for a, t in trials.items()}
    common = set(vals[arm]) & set(vals[baseline]) & set(vals[control])

    def row(a, b):
        return paired_row({x: v for x, v in vals[a].items() if x in common}, vals[b], effect=effect,
                          pair=pair, arm=a, hp=hp, baseline=b, epoch="best_val", metric=metric)

    b, c, cb = row(arm, baseline), row(arm, control), row(control, baseline)
    seeds = sorted(set().union(*(set(t["seed"]) for t in trials.values() if t is not None)) - common)
    why = {(int(x), a): w for x in seeds for a, t in trials.items()
           if (w := _why_not(None if t is None else t[t["seed"] == x], metric))}
    both = set(vals[baseline]) & set(vals[control])
    failed = sorted(x for (x, a), (kind, _) in why.items() if a == arm and kind == "failed" and x in both)
    word = _word(b, c)
    text = word if word in (TOO_FEW, UNDETERMINED) else f"{word} (detectable: ≥ {fmt_mde(b['mde'])} points" + (
        f"; rules out gains above {fmt_points(b['ci_high'])})" if word == "not shown" else ")")
    failure = (f"`{arm}` failed at {len(failed)} of the {len(both)} seeds where `{baseline}` and `{control}` "
               f"finished ({_seed_list(failed)})") if failed else ""
    return {"pair": pair if not hp else f"{pair} ({hp})", "pair_name": pair, "hp": hp, "arm": arm,
            "control": control, "baseline": baseline, "word": word,
            "verdict": text + (f"; {failure}" if failure else ""), "failure": failure, "arm_failed": failed,
            "seeds": sorted(int(x) for x in common), "left_out": [(x, a, w[1]) for (x, a), w in why.items()],
            "mde": math.nan if word in (TOO_FEW, UNDETERMINED) else float(b["mde"]),
            "rules_out_above": math.nan if word in (TOO_FEW, UNDETERMINED) else float(b["ci_high"]),
            "vs_baseline": b, "vs_control": c, "control_vs_baseline": cb}


def transfer_verdicts(df: pd.DataFrame, baseline: str, checks: list[tuple[str, str]],
                      effect: float = EFFECT, positive: list[dict] | None = None,
                      gated: bool = False) -> list[dict]:
    """For each ``(arm, control)`` and pair (and search point of the arm), on the test accuracy at
    the best-validation epoch (the primary number; never selected on test), over one seed set --
    the seeds where the arm, ``baseline`` and ``control`` all finished (``seeds``), for all three
    comparisons (arm vs ``baseline``, arm vs ``control``, ``control`` vs ``baseline``):
    ``transfer shown`` when the arm's 95 % interval against ``baseline`` and against ``control``
    both lie above 0; ``harmful`` when its interval against ``baseline`` lies below 0;
    ``undetermined (identical differences)`` when a comparison that decides has identical
    per-seed differences (no interval); ``not shown`` otherwise (or ``not shown (too few paired
    seeds)`` below 2 common seeds).

    ``word`` is that word; ``verdict`` is the word followed by what the comparison against
    ``baseline`` could detect: ``not shown (detectable: ≥ 2.31 points; rules out gains above
    +1.20)`` — the minimum detectable effect (power 0.8, :func:`mde_paired`) and the upper end of
    the 95 % interval against ``baseline`` — and ``transfer shown (detectable: ≥ 2.31 points)``,
    ``harmful (detectable: ≥ …)``. ``mde`` and ``rules_out_above`` hold those two numbers
    (fractions; NaN without an interval). ``effect`` (fraction) sets the rows' ``n_needed``.

    ``left_out``: ``(seed, arm, why)`` for every seed outside the set and every one of the three
    arms that gave no value there (``FAILED (reason)`` from the run's ``mergenet.failure_reason``,
    ``no trial``, ``RUNNING``, ...). Where the arm failed at seeds at which ``baseline`` and
    ``control`` finished (``arm_failed``), ``failure`` says so and ends ``verdict``: a failure of
    the arm is a result about the arm, never paired away in silence.

    ``positive`` (:func:`positive_controls`): where a pair has positive controls and none is
    shown (:func:`positive_gate`: the same search point, else the pair's unsearched ones), the
    instrument has not shown it can see a known effect there, so the verdict is ``cannot measure
    (no positive control shown; ...)`` whatever the arm's own intervals say. ``gated``
    (positive-control arms were declared): a pair with no positive-control row at all (its
    positive-control trials all failed or are missing) counts as not shown."""
    cols = hp_columns(df)
    out = []
    for arm, control in checks:
        for pair, hp, trials in _verdict_groups(df, arm, (baseline, control), cols):
            v = _one_verdict(pair, hp, trials, baseline, control, effect)
            shown = positive_gate(positive or [], pair, hp)
            if (gated or shown is not None) and not shown:
                v["word"] = "cannot measure"
                v["verdict"] = f"cannot measure (no positive control shown; the arm alone: {v['verdict']})"
            out.append(v)
    return out


def left_out_text(v: dict) -> str:
    """The seeds a verdict leaves out, each with why: ``seed 3: `mergenet` FAILED (…); seed 4:
    `alone` no trial``."""
    by: dict[int, list[str]] = {}
    for x, a, why in v["left_out"]:
        by.setdefault(x, []).append(f"`{a}` {why}")
    return "; ".join(f"seed {x}: " + ", ".join(w) for x, w in sorted(by.items()))


def verdict_lines(verdicts: list[dict]) -> list[str]:
    """One Markdown bullet per (pair, arm): the verdict (with what it could detect, and the arm's
    failures), the intervals behind it, each with its n and minimum detectable effect (points), the
    seeds they share and the seeds left out with why."""
    lines = []
    for v in verdicts:
        def part(r, what):
            mde = r.get("mde", math.nan)
            det = "" if mde is None or math.isnan(mde) else f", detectable ≥ {fmt_mde(mde)}"
            return f"{what} {fmt_diff(r)} (n = {r['n']}{det})"
        left = left_out_text(v)
        lines.append(f"- **{v['pair']} · {v['arm']}: {v['verdict']}** — "
                     + "; ".join([part(v["vs_baseline"], f"vs `{v['baseline']}`"),
                                  part(v["vs_control"], f"vs `{v['control']}`"),
                                  part(v["control_vs_baseline"], f"control `{v['control']}` vs `{v['baseline']}`")])
                     + f". On {_seed_list(v['seeds']) if v['seeds'] else 'no seed'}"
                     + (f"; left out: {left}" if left else "") + ".")
    return lines
