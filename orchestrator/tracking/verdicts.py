"""Verdicts and positive controls, from the paired statistics (:mod:`.paired`).

A positive control is an arm whose gain over the baseline the setting must show before any of
its verdicts count. A transfer verdict (:func:`transfer_verdicts`) rests on one seed set -- where
the arm, the baseline and the control all finished -- and names every seed it leaves out with
its reason; it reads *transfer shown* only when the interval lies above 0 against both the
baseline and the arm's negative control.
"""
from __future__ import annotations

import math

import pandas as pd

from .paired import (EFFECT, METRICS, TOO_FEW, UNDETERMINED, _done, _matching, fmt_diff, fmt_mde, fmt_points, hp_columns, hp_label, paired_row, paired_table)


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
