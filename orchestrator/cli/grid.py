"""``mergenet run``, ``report``, ``summary``, ``overlap``: grids and what they found."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from mergenet_core.errors import MergenetError

from .common import PROG, fail, print_section


def cmd_run(args) -> int:
    """A grid from its file (sources trained, the search run, then the grid), or ``--resume``d from
    its folder; its report at the end."""
    import time

    from orchestrator.grid.tuner import run_grid

    t0, load0 = time.time(), os.getloadavg()[0]
    if not (args.resume or args.grid):
        return fail(["run: give a GRID.yaml, or --resume DIR"])
    grid, selection, times = (None, None, {}) if args.resume else _before_grid(args, t0)
    t_grid = time.time()
    summary = run_grid(grid, address=args.address, resume_dir=args.resume, verbose=args.verbose)
    times["grid"] = time.time() - t_grid
    print(json.dumps(summary, indent=2))
    if not args.no_report:
        account = _run_account(times, time.time() - t0, load0, selection, bool(args.resume))
        _report_after(summary, grid, selection, account)
    from orchestrator import tracking

    uri = tracking.tracking_uri()
    ui = "" if uri.startswith(("http://", "https://")) else f"`mlflow ui --backend-store-uri {uri}`, then "
    print(f"MLflow: {ui}{summary['view']}")
    return 1 if summary["failed"] else 0


def _before_grid(args, t0: float):
    """The grid validated (every trial built once before any work), its sources trained, its
    search run; returns the grid (with the search's winner), the search's record, the times."""
    import time

    from orchestrator import interrupts
    from orchestrator.grid.load import load_grid

    times: dict[str, float] = {}
    selection = None
    grid = load_grid(args.grid, args.set)
    interrupts.install()
    try:
        if grid.sources:  # a source not trained yet, at its planned shapes
            from orchestrator.grid.sources import train_missing

            train_missing(*grid.source_plan())
            times["sources"] = time.time() - t0
        if grid.select is not None:  # the search on the validation split, then the grid with its winner
            from orchestrator.grid.select import run_selection

            grid, selection = run_selection(grid, address=args.address, verbose=args.verbose, again=args.reselect)
            times["search"] = selection["wall_s"]
    except interrupts.Interrupted as e:  # sources and the search resume from the grid file itself
        e.resume = shlex.join([PROG, "run", args.grid, *(x for kv in args.set for x in ("--set", kv))])
        e.what = "search trials" if e.total is not None else e.what
        raise
    return grid, selection, times


def _report_after(summary: dict, grid, selection, account: str) -> None:
    """The grid's report as its ``report:`` section asks (a resumed grid's from its folder)."""
    from orchestrator.cluster.storage import Location
    from orchestrator.grid.config import GridConfig
    from orchestrator.grid.tuner import GRID_FILE
    from orchestrator.tracking.records import RUN_ACCOUNT
    from orchestrator.tracking.report import make_report

    folder = Location.parse(summary["storage"])
    grid = grid or GridConfig.model_validate_json((folder / GRID_FILE).read_text())
    if grid.select is not None and selection is None:  # resumed: the search's record from its folder
        from orchestrator.grid.select import load_selection, markdown

        selection = load_selection(grid, folder.parent)
        account += "\n\n" + markdown(selection)
    spec = grid.report
    (folder / RUN_ACCOUNT).write_text(account)  # `mergenet report` shows it too
    rep = make_report(summary["storage"], baseline=spec.baseline, controls=spec.controls,
                      verdict=spec.verdict_pairs(), effect=spec.effect_points, positive=spec.positive_controls,
                      results_md=spec.results_md, section=spec.section, preamble=account)
    print(rep["console"])
    print(f"report: {rep['markdown']}  forest plot: {rep['forest']}  curves: "
          f"{', '.join(str(p) for p in rep['curves'].values()) or '-'}  trials: {rep['parquet']}"
          + (f"  section of: {spec.results_md}" if spec.results_md else ""))


def _run_account(times: dict[str, float], total: float, load0: float, selection: dict | None,
                 resumed: bool) -> str:
    """What this `mergenet run` did and how long it took (the report's preamble)."""
    from orchestrator.grid.select import markdown

    parts = [f"{k} {v / 60:.1f} min" for k, v in times.items()]
    what = "`mergenet run --resume`" if resumed else "`mergenet run`"
    text = (f"Wall time of this {what}: {', '.join(parts)}; total {total / 60:.1f} min (1-min load average "
            f"{load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end).")
    if selection is not None:
        text += "\n\n" + markdown(selection)
    return text


def cmd_report(args) -> int:
    from orchestrator.tracking.report import make_report

    if Path(args.what).is_file() and not (args.verdict or args.control or args.positive or args.results_md):
        # a grid file and no report options: its own `report:` section, as `mergenet run` uses it
        from mergenet_core.config import ConfigErrors
        from orchestrator.grid.load import load_grid

        try:
            spec = load_grid(args.what, deep=False).report
        except ConfigErrors as e:
            return fail(e.lines)
        args.baseline, args.control, args.positive = spec.baseline, spec.controls, spec.positive_controls
        args.verdict, args.effect, args.results_md = spec.verdicts, spec.effect_points, spec.results_md
        args.section = args.section or spec.section

    checks = []
    for v in args.verdict:
        arm, sep, ctl = v.partition(":")
        if not sep or not arm or not ctl:
            return fail([f"--verdict: '{v[:60]}' is not ARM:CONTROL"])
        checks.append((arm, ctl))
    if not (args.effect > 0 and args.effect != float("inf")):
        return fail([f"--effect: {args.effect} is not a positive number of points"])
    try:
        rep = make_report(args.what, args.out, baseline=args.baseline, controls=args.control,
                          results_md=args.results_md, section=args.section, verdict=checks, effect=args.effect,
                          positive=args.positive)
    except OSError as e:  # an unwritable --out / --results-md
        return fail([f"report: {e.filename or ''}: {e.strerror or e}"])
    print(rep["text"])
    print(f"report: {rep['markdown']}  forest plot: {rep['forest']}  curves: "
          f"{', '.join(str(p) for p in rep['curves'].values()) or '-'}  trials: {rep['parquet']}")
    return 0


def cmd_summary(args) -> int:
    from orchestrator.tracking.summary import summary_markdown

    try:
        text = summary_markdown(args.grids, (args.results_md, args.section) if args.results_md else None)
    except MergenetError as e:
        return fail([str(e)])
    return print_section(args, text)


def cmd_overlap(args) -> int:
    from orchestrator.grid.load import load_grid
    from orchestrator.grid.overlap import overlap_markdown

    return print_section(args, overlap_markdown(args.grids, [load_grid(p, deep=False, build=False) for p in args.grids]))
