"""The search stage of a grid (``select:``): tune an arm on the validation split, then run the
grid with the winner.

``mergenet run GRID.yaml`` with a ``select:`` section first runs the *search grid* -- the
searched arms only, over ``select.search``, on ``select.seeds`` (disjoint from the grid's
verdict seeds) -- as its own Tune grid and MLflow experiment ``GRID-select``. Per pair and
searched arm the configuration with the best mean ``select.metric`` (a validation metric;
test figures are never read) wins; the verdict grid then runs that arm *and the arms that
inherit from it* (its negative controls) with the winning values, as per-pair arm overrides.
The choice is written to ``selection.json`` in the search grid's folder and reused by a later
``mergenet run`` of the same grid (same search grid, same sources); an interrupted search is
resumed, not restarted.
"""
from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd

from mergenet_core.errors import MergenetError
from orchestrator import tracking
from orchestrator.grid.config import GridConfig
from orchestrator.cluster.storage import Location

SELECTION_FILE = "selection.json"


def search_folder(grid: GridConfig, storage: Location | None = None) -> Location:
    """The search grid's folder, ``STORAGE/GRID-select`` (``storage``: the grids' folder, by
    default the grid's ``storage_path``)."""
    return (storage or Location.parse(grid.storage_path or "runs/grids")) / f"{grid.grid}-select"


def load_selection(grid: GridConfig, storage: Location | None = None) -> dict | None:
    """The search's record (``selection.json``), or None before the search has chosen."""
    f = search_folder(grid, storage) / SELECTION_FILE
    return json.loads(f.read_text()) if f.exists() else None


def search_grid(grid: GridConfig) -> GridConfig:
    """The grid the search runs: the searched arms, the search axes and seeds, no report."""
    s = grid.select
    data = grid.model_dump(mode="json", exclude={"select", "report", "search", "num_samples", "scheduler"})
    data.update(grid=f"{grid.grid}-select", seeds=s.seeds, num_samples=s.num_samples,
                methods={a: grid.methods[a] for a in s.arms},
                search={k: v.model_dump(mode="json", exclude_none=True) for k, v in s.search.items()},
                scheduler=s.scheduler.model_dump(mode="json"))
    for p in data["pairs"]:
        p["arms"] = {a: v for a, v in p.get("arms", {}).items() if a in s.arms}
    return GridConfig.model_validate(data)


def _axis_value(axis, logged: str) -> Any:
    """The axis value (a named grid's label) a trial logged as the string ``logged``."""
    for v in axis.bounds() if (axis.grid is not None or axis.choice is not None) else ():
        if str(v) == logged:
            return v
    try:
        return float(logged)
    except ValueError:
        return logged


def choose(df: pd.DataFrame, grid: GridConfig) -> list[dict]:
    """Per (pair, searched arm): every configuration's mean ``select.metric`` over the search
    seeds, best first; the winner is the best among those finished on the most seeds."""
    s = grid.select
    metric = s.metric
    keys = list(s.search)
    cols = [f"hp.{k}" for k in keys]
    out = []
    done = df[(df["status"] == "FINISHED") & df[metric].notna()] if metric in df else df.iloc[0:0]
    for p in grid.pairs:
        for arm in s.arms:
            g = done[(done["pair"] == p.name) & (done["arm"] == arm)]
            if g.empty:
                raise MergenetError(f"select: no finished search trial of arm '{arm}' on pair '{p.name}' "
                                   f"reports {metric}")
            rows = []
            for vals, h in g.groupby([g[c].astype(str) for c in cols], sort=False):
                vals = vals if isinstance(vals, tuple) else (vals,)
                rows.append({"hp": {k: _axis_value(s.search[k], v) for k, v in zip(keys, vals)},
                             "mean": float(h[metric].mean()), "sd": float(h[metric].std(ddof=1)) if len(h) > 1 else 0.0,
                             "n": int(len(h))})
            most = max(r["n"] for r in rows)
            sign = 1 if s.mode == "max" else -1
            rows.sort(key=lambda r: (r["n"] == most, sign * r["mean"]), reverse=True)
            out.append({"pair": p.name, "arm": arm, "inherit": list(s.arms[arm]), "best": rows[0], "all": rows})
    return out


def apply(grid: GridConfig, chosen: list[dict]) -> GridConfig:
    """The verdict grid: each searched arm and its inheriting arms run with the winner (per pair)."""
    data = grid.model_dump(mode="json")
    axes = grid.select.search
    for c in chosen:
        p = next(x for x in data["pairs"] if x["name"] == c["pair"])
        values = {k: axes[k].value(v) for k, v in c["best"]["hp"].items()}
        for a in (c["arm"], *c["inherit"]):
            p.setdefault("arms", {})[a] = {**p.get("arms", {}).get(a, {}), **values}
    return GridConfig.model_validate(data)


def _label(hp: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in hp.items())


def markdown(sel: dict) -> str:
    """The search's account for the report: budget, winners, runner-ups, wall time."""
    lines = [f"Search on the validation split before the verdict grid (`select:`; MLflow experiment "
             f"`{sel['grid']}`): {sel['trials']} trials = {sel['configs']} configurations × "
             f"{len(sel['seeds'])} search seeds {sel['seeds']} per searched arm, scheduler "
             f"{sel['scheduler']}; chosen by the mean of `{sel['metric']}` over the search seeds (test "
             f"accuracy never read); wall time {sel['wall_s'] / 60:.1f} min.", ""]
    for c in sel["chosen"]:
        b = c["best"]
        inherit = f"; its control(s) {', '.join(f'`{a}`' for a in c['inherit'])} run with it too" if c["inherit"] else ""
        lines.append(f"- pair `{c['pair']}`, arm `{c['arm']}`: **{_label(b['hp'])}** — {100 * b['mean']:.2f} % "
                     f"(sd {100 * b['sd']:.2f}, n = {b['n']}){inherit}.")
        for r in c["all"][1:4]:
            lines.append(f"  - then {_label(r['hp'])}: {100 * r['mean']:.2f} % (n = {r['n']})")
        worst = c["all"][-1]
        if len(c["all"]) > 4:
            lines.append(f"  - … worst of {len(c['all'])}: {_label(worst['hp'])}: {100 * worst['mean']:.2f} %")
    return "\n".join(lines)


def run_selection(grid: GridConfig, address: str | None = None, verbose: bool = False,
                  again: bool = False) -> tuple[GridConfig, dict]:
    """Run (or reuse, or resume) the search; returns the verdict grid and the selection record."""
    from orchestrator.tracking.records import trials_frame
    from orchestrator.grid.tuner import GRID_FILE, run_grid

    sgrid = search_grid(grid)
    folder = search_folder(grid)
    same = (folder / GRID_FILE).exists() and (json.loads((folder / GRID_FILE).read_text())
                                              == json.loads(sgrid.model_dump_json()))
    sel = load_selection(grid) if same and not again else None
    if sel is not None:
        print(f"select: reusing the search of {folder} ({sel['trials']} trials; `--reselect` runs it again)",
              flush=True)
        return apply(grid, sel["chosen"]), sel
    t0 = time.time()
    resume = same and not again
    if resume:
        print(f"select: resuming the interrupted search in {folder}", flush=True)
    summary = run_grid(None if resume else sgrid, address=address, resume_dir=str(folder) if resume else None,
                       verbose=verbose)
    c = tracking.existing_client()
    parent = summary["parent_run_id"]
    df = trials_frame(c, summary["experiment_id"], parent)
    ended = int(df["status"].isin(["FINISHED", "FAILED"]).sum())
    if ended < sgrid.trial_count():  # stopped early (Ctrl-C): no winner from a partial search
        raise MergenetError(f"select: the search stopped after {ended} of {sgrid.trial_count()} trials; "
                            f"`mergenet run` of the same grid resumes it ({folder})")
    chosen = choose(df, grid)
    s = grid.select
    sel = {"grid": sgrid.grid, "trials": sgrid.trial_count(), "configs": sgrid.trial_count() // max(
               1, len(s.seeds) * len(s.arms) * len(grid.pairs)), "seeds": s.seeds, "metric": s.metric,
           "scheduler": s.scheduler.name, "wall_s": time.time() - t0, "failed": summary["failed"],
           "chosen": chosen}
    (folder / SELECTION_FILE).write_text(json.dumps(sel, indent=2, default=str))
    c.log_text(parent, markdown(sel), "selection.md")
    return apply(grid, chosen), sel
