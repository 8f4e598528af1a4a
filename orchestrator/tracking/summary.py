"""``mergenet summary GRID.yaml ...``: one table over several grids' latest submissions -- the
study ladder's summary on top of docs/RESULTS.md.

Per grid (a *setting*), read from MLflow like ``mergenet report``: its positive controls, its
verdicts (``report.verdicts``; the first is the setting's primary comparison) and every arm's
paired difference to the baseline at the best-validation epoch. One row per setting × arm: Δ vs
the baseline and vs the arm's control (where a verdict names one) with their 95 % intervals, the
detectable effect (MDE against the baseline), and the verdict; under the table, per setting: the
data, seeds, trials, the search's budget and winner, and the measured wall times.
"""
from __future__ import annotations

from pathlib import Path

from mergenet_core.errors import MergenetError
from orchestrator.tracking import paired
from orchestrator.tracking import verdicts as vd
from orchestrator import tracking
from orchestrator.cluster.storage import Location


def _cell(r) -> str:
    if r is None or (r.get("excludes_zero") is None and not r.get("identical")):
        return "–"
    return paired.fmt_diff(r)


def _mde(r) -> str:
    return "–" if r is None or r.get("excludes_zero") is None else f"{paired.fmt_mde(r['mde'])}"


def setting_rows(path: str | Path, carried_from: tuple[str, str] | None = None) -> tuple[list[list[str]], list[str]]:
    """(table rows, notes) of one grid; a grid never run gives one row saying so, or, with
    ``carried_from`` (the Markdown file and section this summary is written to), the rows that
    section held for it (``orchestrator/tracking/carried.py``)."""
    from orchestrator.grid.load import load_grid
    from orchestrator.tracking.records import at_common_epoch, resolve_experiment, score_name, trials_frame

    grid = load_grid(path, deep=False)
    label = f"`{Path(path).name}`"
    try:
        c = tracking.existing_client()
    except MergenetError:  # no store here at all: every setting is carried over or not run
        c = None
    if c is None or c.get_experiment_by_name(grid.grid) is None:
        from orchestrator.tracking.carried import carried_rows

        shuffled = {a for a, o in grid.methods.items() if o.get("control") == "shuffled_source"}
        kept = carried_rows(label, *carried_from, shuffled) if carried_from else None
        return kept or ([[label, "–", "–", "–", "–", f"not run yet (`mergenet run {path}`)"]], [])
    experiment_id, name, parent = resolve_experiment(c, grid.grid)
    try:
        df = trials_frame(c, experiment_id, parent)
    except MergenetError:
        return [[label, "–", "–", "–", "–", "no finished trial yet"]], []
    folder = Location.parse(grid.storage_path or "runs/grids")
    score = score_name(grid)
    df, stops = at_common_epoch(c, df, folder / grid.grid, score=score)
    rows = _arm_rows(grid, df, label)
    return rows, [_setting_note(c, grid, df, label, name, parent, score, folder), *stops]


def _arm_rows(grid, df, label: str) -> list[list[str]]:
    """One row per arm (the baseline left out): its Δ against the baseline and its control, the
    smallest effect it could detect, and what it is (verdict, positive or negative control)."""
    spec = grid.report
    base = spec.baseline
    pos = vd.positive_controls(df, base, spec.positive_controls) if spec.positive_controls else []
    verdicts = vd.transfer_verdicts(df, base, spec.verdict_pairs(), positive=pos,
                                        gated=bool(spec.positive_controls))
    table = paired.paired_table(df, base)
    best = table[table["epoch"] == "best_val"]
    by_arm = {v["arm"]: v for v in verdicts}
    controls = {v["control"] for v in verdicts}
    shown = {v["arm"]: v["shown"] for v in pos}
    primary = spec.verdict_pairs()[0][0] if spec.verdicts else None
    rows = []
    for arm in grid.methods:
        if arm == base:
            continue
        r = best[best["arm"] == arm]
        v = by_arm.get(arm)
        r = v["vs_baseline"] if v is not None else r.iloc[0] if len(r) else None  # a verdict's: its seed set
        if arm in shown:
            word = "positive control: **shown**" if shown[arm] else "positive control: **not shown**"
        elif v is not None:
            word = f"**{v['word']}**" + (" (primary)" if arm == primary else " (secondary)") + (
                f"; {v['failure']}" if v["failure"] else "")
        elif arm in controls:
            word = "negative control"
        else:
            word = "secondary (no control)"
        ctl = f"{_cell(v['vs_control'])} (`{v['control']}`)" if v is not None else "–"
        rows.append([label, f"`{arm}`", _cell(r), ctl, _mde(r), word])
    return rows


def _setting_note(c, grid, df, label: str, name: str, parent: str | None, score: str, folder) -> str:
    """The setting's budget and cost: target, data, epochs, seeds, finished trials, wall times,
    the search's winners."""
    from mergenet_core.data import task_title
    from orchestrator.tracking.records import RUN_ACCOUNT

    base = grid.report.baseline
    t = grid.trial_dict(grid.pairs[0].name, base if base in grid.methods else next(iter(grid.methods)),
                        grid.seeds[0])
    task = t["target"]["task"]
    opts = task.get("options", {})
    rec = t.get("recipe", {})
    note = (f"{label} (`{name}`): target `{t['target']['model']['name']}` on **{task_title(task['name'])}**, "
            f"{opts.get('train_subset', 'all')} training examples, {rec.get('epochs', '?')} epochs; "
            f"{len(grid.seeds)} verdict seeds {grid.seeds}; {(df['status'] == 'FINISHED').sum()} of {len(df)} "
            f"trials finished")
    if score != "accuracy":
        note += f"; its Δ and accuracies read **{score}**"
    info = c.get_run(parent).info if parent else None
    if info is not None and info.end_time and info.start_time:
        note += f"; verdict grid {(info.end_time - info.start_time) / 60000:.1f} min"
    if grid.select is not None:
        from orchestrator.grid.select import load_selection

        sel = load_selection(grid, folder)
        if sel is not None:
            wins = "; ".join(f"`{x['arm']}`: " + ", ".join(f"{k.split('.')[-1]}={val}" for k, val in x["best"]["hp"].items())
                             + f" ({100 * x['best']['mean']:.2f} % validation)" for x in sel["chosen"])
            note += f"; search {sel['trials']} trials in {sel['wall_s'] / 60:.1f} min, winners {wins}"
    acct = folder / grid.grid / RUN_ACCOUNT
    if acct.exists():
        first = acct.read_text().split("\n\n", 1)[0].strip()
        note += f". {first}"
    return note


def summary_markdown(paths: list[str | Path], carried_from: tuple[str, str] | None = None) -> str:
    head = ["setting", "arm", "Δ vs `alone` (points, 95 % CI)", "Δ vs its control", "detectable (MDE vs `alone`)",
            "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    notes = []
    for p in paths:
        rows, n = setting_rows(p, carried_from)
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        notes += n
    intro = ("*Written by `mergenet summary " + " ".join(str(p) for p in paths) + "`* from each setting's latest "
             "submission in MLflow (a setting this store never ran keeps the rows this section held for it, "
             "marked carried over in its note). Test accuracy at each run's best-validation epoch; Δ = the arm minus `alone` "
             "at the same seed (same data subset, initialisation and batch order), mean over seeds with a 95 % "
             "Student-t interval; a verdict's two Δ on one seed set, where the arm, `alone` and the control all "
             "finished (an arm that failed where they finished is named at its verdict). *Transfer shown*: both "
             "intervals (vs `alone`, vs the arm's control) above 0; "
             "*cannot measure*: no positive control of the setting is shown, so the setting cannot see a known "
             "effect; *" + paired.UNDETERMINED + "*: every seed gave the same Δ, so there is no interval; "
             "*detectable*: the smallest true gain the paired test finds with probability 0.8. The first "
             "verdict of each setting is its primary comparison, declared in its file before it ran; the rest "
             "are secondary and not corrected for multiplicity.")
    return "\n".join([intro, "", *lines, "", *(f"- {n}" for n in notes)])
