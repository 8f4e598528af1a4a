"""``mergenet`` command line.

Every user-fixable problem (bad config, missing data) ends with exit code 2 and one line per
problem on stderr, never a traceback. Configs are validated before any Ray or MLflow work.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from mergenet_core.errors import MergenetError

PROG = "mergenet"  # the program's name: argparse prog= and the resume commands it prints

EXIT_USAGE = 2


#: an error line never grows past this (it may quote a short prefix of a value, never all of it)
MAX_LINE = 400


def _fail(lines: list[str], prefix: str = "") -> int:
    from mergenet_core.errors import short

    for line in lines:
        if prefix and line.startswith(prefix):  # the message already names the file
            line = line[len(prefix):]
        print(short(f"error: {prefix}{line}", MAX_LINE), file=sys.stderr)
    return EXIT_USAGE


def _load(path: str, overrides: list[str] | None = None):
    from orchestrator.config import load_config

    return load_config(path, overrides)


def cmd_validate(args) -> int:
    from mergenet_core.config import ConfigErrors

    bad = 0
    for path in args.configs:
        try:
            warnings: list[str] = []
            if args.deep and sys.stderr.isatty():  # seconds per pair: say what is going on
                print(f"{path}: building every pair (--deep: data, weights, adapters) ...", file=sys.stderr,
                      flush=True)
            load_any(path, args.set, warnings, deep=args.deep)
            for w in warnings:
                print(f"warning: {path}: {w}", file=sys.stderr)
            print(f"ok: {path}")
        except ConfigErrors as e:
            bad += 1
            _fail(e.lines, f"{path}: ")
        except MergenetError as e:
            bad += 1
            _fail([str(e)], f"{path}: ")
    return EXIT_USAGE if bad else 0


def load_any(path: str, overrides: list[str] | None = None, warnings: list[str] | None = None,
             deep: bool = True):
    """A pair config, or a grid config (``pairs:`` key) — validated either way; the methods'
    warnings (e.g. a layer pair writing into an unnormalised layer) go to ``warnings``.
    ``deep``: build every pair (data decoded, models with weights, adapters); else the fast
    check from file metadata and weightless models (no Ray, no MLflow)."""
    from mergenet_core.config import read_yaml

    try:
        is_grid = "pairs" in read_yaml(path)
    except MergenetError:
        is_grid = False
    if is_grid:
        from orchestrator.grid.config import load_grid

        return load_grid(path, overrides, warnings=warnings, build=deep)
    cfg = _load(path, overrides)
    from mergenet_core.config import ConfigErrors
    from orchestrator.grid.config import check_layers

    problems = check_layers(cfg, warnings, build=deep)  # layer names, ranks, data present
    if problems:
        raise ConfigErrors(problems)
    return cfg


def cmd_train(args) -> int:
    from mergenet_core.io.safe_io import prepare_run_dir

    cfg = _load(args.config, args.set)
    out = Path(args.out or Path("runs") / f"{cfg.name}-s{cfg.seed}")
    # nothing lost: a folder holding a run needs --resume or --overwrite; --resume needs a checkpoint
    prepare_run_dir(out, resume=args.resume, overwrite=args.overwrite, ray=args.ray)
    if args.ray and args.resume:  # a corrupt or foreign checkpoint: one line here, not a worker failure
        from mergenet_core.io.safe_io import load_checkpoint, ray_checkpoints

        load_checkpoint(ray_checkpoints(out)[-1])
    if args.ray:
        from orchestrator.pair import preflight, run_pair_on_ray

        plan = preflight(cfg, address=args.address)
        final = run_pair_on_ray(cfg, out, address=args.address, resume=args.resume, plan=plan)
    else:
        from mergenet_core.training.engine import Engine
        from orchestrator import interrupts

        interrupts.install()  # the last checkpoint.pt is what --resume continues from
        try:
            final = Engine(cfg, out, progress=not args.quiet).run(resume=args.resume)
        except interrupts.Interrupted as e:
            e.finished, e.total, e.what = _saved_epoch(out), cfg.target.recipe.epochs, "epochs"
            e.resume = shlex.join([PROG, "train", args.config, *(x for kv in args.set for x in ("--set", kv)),
                                   "--out", str(out), "--resume"])
            raise
    print(json.dumps(final, indent=2))
    print(f"outputs: {out}")
    return 0


def _saved_epoch(out: Path) -> int:
    """The epoch of the run's last bundle (what ``--resume`` continues from)."""
    from mergenet_core.training.loop import CHECKPOINT, load_bundle

    return int(load_bundle(out / CHECKPOINT)["epoch"]) if (out / CHECKPOINT).exists() else 0


def cmd_pairs(args) -> int:
    from mergenet_core.data import get_modality
    from mergenet_core.models import MODELS, build_model
    from mergenet_core.models.inspect import describe, rank_targets, suggest_pairs

    models = {}
    for role, name in (("source", args.source), ("target", args.target)):
        # built on its modality's stand-in task (no data read)
        info = get_modality(MODELS.get(name).meta.get("modality", "image")).example_info(args.num_classes)
        models[role] = build_model(name, {}, info)
        rows = describe(models[role])
        print(f"# {role}: {name} ({sum(r.numel for r in rows):,} parameters)")
        for r in rows:
            if len(r.shape) >= 2 or args.all:
                mark = "normalised" if r.normalised else ("UNNORMALISED" if r.pairable else "")
                print(f"  {r.name:<55} {str(tuple(r.shape)):<22} {r.role:<17} {mark}")
    print("# target candidates, safest first (a normalisation layer follows; classifier / "
          "unnormalised layers last and marked)")
    for r in rank_targets(describe(models["target"]))[:args.top]:
        risk = "" if r.normalised else "   # UNNORMALISED: writes rescale its output" + (
            " (classifier)" if r.role == "classifier" else "")
        print(f"  {r.name:<55} {str(tuple(r.shape)):<22}{risk}")
    print("# suggested layer pairs (source -> target)")
    for s, t, why in suggest_pairs(models["source"], models["target"]):
        print(f"  - {{source: {s}, target: {t}}}   # {why}")
    return 0


def cmd_run(args) -> int:
    import time

    from orchestrator import interrupts

    t0, load0 = time.time(), os.getloadavg()[0]
    times: dict[str, float] = {}
    selection = None
    if args.resume:
        grid = None
    elif not args.grid:
        return _fail(["run: give a GRID.yaml, or --resume DIR"])
    else:
        from orchestrator.grid.config import load_grid

        # every trial built once before any work; a source not trained yet at its planned shapes
        grid = load_grid(args.grid, args.set)
        interrupts.install()
        try:
            if grid.sources:
                from orchestrator.grid.sources import train_missing

                train_missing(*grid.source_plan())
                times["sources"] = time.time() - t0
            if grid.select is not None:  # the search on the validation split, then the grid with its winner
                from orchestrator.grid.select import run_selection

                grid, selection = run_selection(grid, address=args.address, verbose=args.verbose,
                                                again=args.reselect)
                times["search"] = selection["wall_s"]
        except interrupts.Interrupted as e:  # sources and the search resume from the grid file itself
            e.resume = shlex.join([PROG, "run", args.grid, *(x for kv in args.set for x in ("--set", kv))])
            e.what = "search trials" if e.total is not None else e.what
            raise
    from orchestrator.grid.tuner import run_grid

    t_grid = time.time()
    summary = run_grid(grid, address=args.address, resume_dir=args.resume, verbose=args.verbose)
    times["grid"] = time.time() - t_grid
    print(json.dumps(summary, indent=2))
    if not args.no_report:
        from orchestrator.grid.config import GridConfig
        from orchestrator.tracking.report import make_report
        from orchestrator.cluster.storage import Location
        from orchestrator.grid.tuner import GRID_FILE

        # the grid's `report:` section (baseline, negative controls, verdicts); a resumed grid's from its folder
        grid = grid or GridConfig.model_validate_json((Location.parse(summary["storage"]) / GRID_FILE).read_text())
        if grid.select is not None and selection is None:  # resumed: the search's record from its folder
            from orchestrator.grid.select import load_selection

            selection = load_selection(grid, Location.parse(summary["storage"]).parent)
        from orchestrator.tracking.report import RUN_ACCOUNT

        spec = grid.report
        account = _run_account(times, time.time() - t0, load0, selection, bool(args.resume))
        (Location.parse(summary["storage"]) / RUN_ACCOUNT).write_text(account)  # `mergenet report` shows it too
        rep = make_report(summary["storage"], baseline=spec.baseline, controls=spec.controls,
                          verdict=spec.verdict_pairs(), effect=spec.effect_points,
                          positive=spec.positive_controls, results_md=spec.results_md, section=spec.section,
                          preamble=account)
        print(rep["console"])
        print(f"report: {rep['markdown']}  forest plot: {rep['forest']}  curves: "
              f"{', '.join(str(p) for p in rep['curves'].values()) or '-'}  trials: {rep['parquet']}"
              + (f"  section of: {spec.results_md}" if spec.results_md else ""))
    from orchestrator import tracking

    uri = tracking.tracking_uri()
    ui = "" if uri.startswith(("http://", "https://")) else f"`mlflow ui --backend-store-uri {uri}`, then "
    print(f"MLflow: {ui}{summary['view']}")
    return 1 if summary["failed"] else 0


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
        from orchestrator.grid.config import load_grid

        try:
            spec = load_grid(args.what, deep=False).report
        except ConfigErrors as e:
            return _fail(e.lines)
        args.baseline, args.control, args.positive = spec.baseline, spec.controls, spec.positive_controls
        args.verdict, args.effect, args.results_md = spec.verdicts, spec.effect_points, spec.results_md
        args.section = args.section or spec.section

    checks = []
    for v in args.verdict:
        arm, sep, ctl = v.partition(":")
        if not sep or not arm or not ctl:
            return _fail([f"--verdict: '{v[:60]}' is not ARM:CONTROL"])
        checks.append((arm, ctl))
    if not (args.effect > 0 and args.effect != float("inf")):
        return _fail([f"--effect: {args.effect} is not a positive number of points"])
    try:
        rep = make_report(args.what, args.out, baseline=args.baseline, controls=args.control,
                          results_md=args.results_md, section=args.section, verdict=checks, effect=args.effect,
                          positive=args.positive)
    except OSError as e:  # an unwritable --out / --results-md
        return _fail([f"report: {e.filename or ''}: {e.strerror or e}"])
    print(rep["text"])
    print(f"report: {rep['markdown']}  forest plot: {rep['forest']}  curves: "
          f"{', '.join(str(p) for p in rep['curves'].values()) or '-'}  trials: {rep['parquet']}")
    return 0


def cmd_summary(args) -> int:
    from orchestrator.tracking.summary import summary_markdown

    try:
        text = summary_markdown(args.grids, (args.results_md, args.section) if args.results_md else None)
    except MergenetError as e:
        return _fail([str(e)])
    return _print_section(args, text)


def _print_section(args, text: str) -> int:
    """Print a command-written section, and write it into ``--results-md`` when given."""
    from orchestrator.tracking.report import write_section

    print(text)
    if args.results_md:
        write_section(args.results_md, args.section, text)
        print(f"section '{args.section}' of {args.results_md}")
    return 0


def cmd_overlap(args) -> int:
    from orchestrator.grid.overlap import overlap_markdown

    return _print_section(args, overlap_markdown(args.grids))


# --------------------------------------------------------------------------- cluster jobs (orchestrator.cluster.submit)


def cmd_submit(args) -> int:
    from orchestrator.cluster.submit import submit

    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    if len(env) != len(args.env):
        return _fail([f"--env: expected KEY=VALUE, got {[kv for kv in args.env if '=' not in kv]}"])
    submit(args.grid, args.address, args.set, args.working_dir, args.mlflow_uri, args.storage_path, args.python,
           env, deep=not args.no_deep_check, resume_dir=args.resume)
    return 0


def cmd_status(args) -> int:
    from orchestrator.cluster.submit import status

    state = status(args.job, args.address, wait=args.wait, timeout=args.timeout)
    return 1 if args.wait and state != "SUCCEEDED" else 0


def cmd_logs(args) -> int:
    from orchestrator.cluster.submit import logs

    state = logs(args.job, args.address, follow=args.follow)
    return 1 if args.follow and state in ("FAILED", "STOPPED") else 0


def cmd_stop(args) -> int:
    from orchestrator.cluster.submit import stop

    stop(args.job, args.address)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].replace("``", ""))
    sub = p.add_subparsers(dest="cmd", required=True)

    v = sub.add_parser("validate", help="validate pair or grid configs (exit 2 on any error)",
                       description="Validate pair or grid configs: one 'error: FILE: field: problem' line per "
                                   "problem, exit 2. By default fast (about a second): data checked by file "
                                   "presence and headers, models built without weights. --deep builds every "
                                   "pair as training would (data decoded, weights loaded, adapters built).")
    v.add_argument("configs", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--deep", action="store_true",
                   help="build every pair (slow: decodes the data, loads pretrained and init_from weights)")
    v.set_defaults(fn=cmd_validate)

    t = sub.add_parser("train", help="train one pair (single process, or on Ray with --ray)")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", help="output directory (default runs/NAME-sSEED)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out (default: refuse)")
    t.add_argument("--ray", action="store_true", help="run through the Ray pair topology")
    t.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    pr = sub.add_parser("pairs", help="list two models' parameters and suggest layer pairs")
    pr.add_argument("source")
    pr.add_argument("target")
    pr.add_argument("--num-classes", type=int, default=10)
    pr.add_argument("--all", action="store_true", help="include 1-D parameters")
    pr.add_argument("--top", type=int, default=10, help="how many ranked target candidates to list")
    pr.set_defaults(fn=cmd_pairs)

    r = sub.add_parser("run", help="run a grid of pairs x methods x seeds on Ray Tune, tracked in MLflow")
    r.add_argument("grid", nargs="?")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    r.add_argument("--resume", metavar="DIR_OR_URI",
                   help="resume an interrupted grid from its storage folder (a local path or a bucket URI)")
    r.add_argument("--no-report", action="store_true", help="skip the report at the end")
    r.add_argument("--reselect", action="store_true",
                   help="run the grid's search (`select:`) again instead of reusing its earlier winner")
    r.add_argument("--verbose", action="store_true", help="also print Ray Tune's status tables")
    r.set_defaults(fn=cmd_run)

    rp = sub.add_parser("report", help="pair x arm tables with paired statistics, Parquet, forest plot and learning curves")
    rp.add_argument("what", help="grid YAML, grid storage folder, or MLflow experiment name")
    rp.add_argument("--out", help="output folder (default runs/reports/GRID)")
    rp.add_argument("--baseline", default="alone", metavar="ARM", help="arm every other arm is paired with (default alone)")
    rp.add_argument("--control", action="append", default=[], metavar="ARM",
                    help="also pair every other arm with this arm (e.g. mergenet_untrained); repeatable")
    rp.add_argument("--verdict", action="append", default=[], metavar="ARM:CONTROL",
                    help="a one-line transfer verdict per pair for ARM against its negative control arm "
                         "(e.g. mergenet:mergenet_untrained); repeatable")
    rp.add_argument("--positive", action="append", default=[], metavar="ARM",
                    help="a positive-control arm (its gain over the baseline must be shown, else the pair's "
                         "verdicts read 'cannot measure'); repeatable")
    rp.add_argument("--effect", type=float, default=1.0, metavar="POINTS",
                    help="true gain the paired tables' 'seeds needed' column is for, in points (default 1.0)")
    rp.add_argument("--results-md", metavar="PATH", help="also write the tables as a section of this Markdown file")
    rp.add_argument("--section", metavar="TITLE", help="that section's title (default: the grid name); "
                                                        "re-running replaces only this section")
    rp.set_defaults(fn=cmd_report)

    sm = sub.add_parser("summary", help="one table over several grids' verdicts (the study's summary)")
    sm.add_argument("grids", nargs="+", metavar="GRID.yaml")
    sm.add_argument("--results-md", metavar="PATH", help="also write it as a section of this Markdown file")
    sm.add_argument("--section", default="Does knowledge move? The study ladder (summary)", metavar="TITLE")
    sm.set_defaults(fn=cmd_summary)

    ov = sub.add_parser("overlap", help="count the targets' validation/test examples each grid's donors trained on")
    ov.add_argument("grids", nargs="+", metavar="GRID.yaml")
    ov.add_argument("--results-md", metavar="PATH", help="also write it as a section of this Markdown file")
    ov.add_argument("--section", default="Donors and the targets' validation examples", metavar="TITLE")
    ov.set_defaults(fn=cmd_overlap)

    addr_help = "Ray job server (default: RAY_API_SERVER_ADDRESS, or http://127.0.0.1:8265 = an SSH tunnel)"
    sb = sub.add_parser("submit", help="run a grid on a Ray cluster as a Ray job (ships this directory)")
    sb.add_argument("grid", nargs="?")
    sb.add_argument("--resume", metavar="DIR_OR_URI",
                    help="resume an interrupted grid from its storage folder on the cluster (path or bucket URI)")
    sb.add_argument("--address", default=None, help=addr_help)
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sb.add_argument("--mlflow-uri", default=None, help="tracking URI for the job (default: the cluster's)")
    sb.add_argument("--storage-path", default=None, help="grid storage when the grid sets none (default: the "
                                                         "cluster's MERGENET_STORAGE_PATH)")
    sb.add_argument("--python", default="python", help="python on the head (a full path if not on its PATH)")
    sb.add_argument("--working-dir", default=".", help="folder shipped with the job (default: .)")
    sb.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job env vars")
    sb.add_argument("--no-deep-check", action="store_true", help="skip the local data/layer checks")
    sb.set_defaults(fn=cmd_submit)

    st = sub.add_parser("status", help="state of a submitted job (or list the cluster's jobs)")
    st.add_argument("job", nargs="?")
    st.add_argument("--address", default=None, help=addr_help)
    st.add_argument("--wait", action="store_true", help="wait for the end; exit 1 unless it SUCCEEDED")
    st.add_argument("--timeout", type=float, default=None, help="seconds to --wait at most")
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser("logs", help="driver log of a submitted job")
    lg.add_argument("job")
    lg.add_argument("--address", default=None, help=addr_help)
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lg.set_defaults(fn=cmd_logs)

    sp = sub.add_parser("stop", help="stop a submitted job")
    sp.add_argument("job")
    sp.add_argument("--address", default=None, help=addr_help)
    sp.set_defaults(fn=cmd_stop)

    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported: no INFO lines
    if args.cmd == "run" and not (args.address or os.environ.get("RAY_ADDRESS")):
        # a local Ray started by this process: token authentication, the mode a new local Ray picks
        # anyway, set explicitly (Ray then does not warn that it picked it). Ray reads it on import.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        return args.fn(args)
    except MergenetError as e:
        from mergenet_core.config import ConfigErrors

        return _fail(e.lines if isinstance(e, ConfigErrors) else [str(e)])
    except KeyboardInterrupt as e:  # orchestrator/interrupts.py: one closing line, 130 (SIGINT) / 143 (SIGTERM)
        from orchestrator.interrupts import Interrupted

        if isinstance(e, Interrupted):
            _quiet_ray_before_closing()
            print(e.closing_line(), flush=True)
            return e.exit_code
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130
    finally:
        from orchestrator import interrupts

        interrupts.uninstall()


def _quiet_ray_before_closing() -> None:
    """Disconnect from Ray before the closing line: Ray forwards what its worker processes print
    to this console from a thread, and a trial process stopped by the interrupt may still print
    (a fatal-error dump as Tune force-kills it). After ``ray.shutdown`` nothing more is forwarded,
    so the closing line is the last line (and a local Ray started here is gone, as at exit)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the closing line and exit code matter more
            pass


if __name__ == "__main__":
    sys.exit(main())
