"""The ``mergenet`` argument parser: one function per group of commands."""
from __future__ import annotations

import argparse

from .grid import cmd_overlap, cmd_report, cmd_run, cmd_summary
from .jobs import cmd_logs, cmd_status, cmd_stop, cmd_submit
from .pair import cmd_pairs, cmd_train, cmd_validate
from .common import PROG


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=description)
    sub = p.add_subparsers(dest="cmd", required=True)
    _pair_commands(sub)
    _grid_commands(sub)
    _table_commands(sub)
    _job_commands(sub)
    return p


def _pair_commands(sub) -> None:
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

    pr = sub.add_parser("pairs", help="list two models' parameters and suggest layer pairs",
                        description="Two registered models by name (with their options), or the source and target "
                                    "of a pair config (--config), built without weights on their tasks' shapes.")
    pr.add_argument("source", nargs="?", help="model name (e.g. resnet18, torchvision, hf)")
    pr.add_argument("target", nargs="?", help="model name")
    pr.add_argument("--source-options", default=None, metavar="YAML",
                    help="the source model's options, e.g. '{name: resnet50, kwargs: {width_per_group: 32}}'")
    pr.add_argument("--target-options", default=None, metavar="YAML", help="the target model's options")
    pr.add_argument("--config", default=None, metavar="PAIR.yaml",
                    help="take both models (and their tasks and plugins) from a pair config")
    pr.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                    help="import a plugin first (repeatable; installed entry points always load)")
    pr.add_argument("--num-classes", type=int, default=10)
    pr.add_argument("--all", action="store_true", help="include 1-D parameters")
    pr.add_argument("--top", type=int, default=10, help="how many ranked target candidates to list")
    pr.set_defaults(fn=cmd_pairs)


def _grid_commands(sub) -> None:
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


def _table_commands(sub) -> None:
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


def _job_commands(sub) -> None:
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
