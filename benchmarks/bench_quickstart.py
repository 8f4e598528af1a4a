#!/usr/bin/env python
"""Quickstart benchmark: the README's main command, timed and measured as a new user would see it.

    python benchmarks/bench_quickstart.py [--wait-load 1.0] [--max-wait 300] [--keep DIR]

Runs ``mergenet run experiments/quickstart.yaml`` (as ``python -m orchestrator.cli``, the
console script's entry point, from this checkout) in a fresh temporary working directory that
holds a copy of ``experiments/``: a new local Ray, a new MLflow sqlite store (``mlflow.db``,
``mlartifacts/``) and ``runs/`` there. The command gets this process's environment as it was
before anything here set defaults (``_benchutil`` sets thread and Ray variables for the other
benchmarks), minus ``MLFLOW_TRACKING_URI`` / ``RAY_ADDRESS``.

Records: wall time; time to the first trial start (validation, MLflow, Ray start-up); the trial
overhead share = Σ over trials (trial wall − training time) / Σ trial wall, with the trial wall
the MLflow child run's start → end and the training time the sum of ``time/epoch_s`` (training
and evaluation of each epoch) in the trial's ``metrics.jsonl``; the lines printed (stdout +
stderr) and any error-level line, traceback or warning among them; the bytes written under
``runs/`` and to ``mlflow.db`` / ``mlartifacts/``; the ``alone`` accuracies; the machine and its
load average before and after. Writes ``benchmarks/results/bench_quickstart.json`` and the
section "Quickstart" of ``docs/BENCHMARKS.md``, with each target (≤ 3 min, ≤ 150 lines,
≤ 300 MB) stated as met or NOT met, and the report's headline (its verdict lines) quoted.
"""
from __future__ import annotations

import os

CLEAN_ENV = dict(os.environ)  # before _benchutil sets its defaults: the command runs as a user would run it

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _benchutil as bu  # noqa: E402

COMMAND = "mergenet run experiments/quickstart.yaml"
TARGETS = {"wall_s": 180.0, "lines": 150, "bytes": 300 * 1000**2}
#: a console line that a healthy run must not print (error level, traceback, Ray/Python warnings)
BAD = re.compile(r"Traceback|\bERROR\b|\berror\b|\bWARNING\b|Warning:|\bE\d{4} |\[\d{4}-\d\d-\d\d [\d:,]+ [EW] ")
SECTION = "bench_quickstart"
HEADER = "# Benchmarks\n"


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def trial_times(work: Path) -> list[dict]:
    """Per trial: MLflow child run wall (start -> end) and Σ time/epoch_s of its metrics.jsonl."""
    env_uri = f"sqlite:///{work / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=env_uri)
    exp = c.get_experiment_by_name("quickstart")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`mergenet.trial` = '1'", max_results=1000)
    out = []
    for r in runs:
        tid = r.data.tags.get("mergenet.trial_id")
        metrics = work / "runs" / "grids" / "quickstart" / "trials" / str(tid) / "pair" / "metrics.jsonl"
        recs = [json.loads(l) for l in metrics.read_text().splitlines() if l] if metrics.exists() else []
        train = sum(float(x.get("time/epoch_s", 0.0)) for x in recs)
        wall = ((r.info.end_time or 0) - r.info.start_time) / 1000.0
        out.append({"trial": tid, "name": r.info.run_name, "wall_s": round(wall, 2), "train_s": round(train, 2),
                    "status": r.info.status})
    return sorted(out, key=lambda t: t["trial"] or "")


def alone_accuracy(work: Path) -> dict:
    import pandas as pd

    df = pd.read_parquet(work / "runs" / "reports" / "quickstart" / "trials.parquet")
    df = df[df["arm"] == "alone"]
    return {p: {"mean": float(g["target/final_test_acc"].mean()), "n": int(len(g)),
                "values": [round(float(v), 4) for v in g["target/final_test_acc"]]}
            for p, g in df.groupby("pair")}


def adapter_sizes() -> dict:
    """Trainable parameters of each pair's MergeNet adapters against its target model (the
    quickstart's `mergenet` arm, seed 0, built on CPU after the timed run: sizes, not timings)."""
    from mergenet_core.io.init_weights import validating
    from mergenet_core.training.loop import PairState
    from orchestrator.grid.load import load_grid

    grid = load_grid(bu.ROOT / "experiments" / "quickstart.yaml")
    out = {}
    for p in grid.pairs:
        with validating():  # sizes only: a source not trained here is built at its planned shapes
            pair = PairState.build(grid.trial_config(p.name, "mergenet", grid.seeds[0]))
        out[p.name] = {"adapter": int(sum(pair.method.exchange.hub.param_counts().values())),
                       "target": int(sum(t.numel() for t in pair.roles["target"].model.parameters()))}
    return out


def run(args) -> dict:
    m = bu.machine_record()
    waited = bu.wait_for_load(args.wait_load, args.max_wait, log=lambda s: print(s, file=sys.stderr))
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="mergenet-quickstart-"))
    if args.keep:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    shutil.copytree(bu.ROOT / "experiments", work / "experiments")
    env = {k: v for k, v in CLEAN_ENV.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(bu.ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    argv = [sys.executable, "-m", "orchestrator.cli", "run", "experiments/quickstart.yaml"]
    load_start = bu.loadavg()
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines, first_trial = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if first_trial is None and " RUNNING " in line:
            first_trial = time.time() - t0
        if args.echo:
            print(line, end="", flush=True)
    rc = proc.wait()
    wall = time.time() - t0
    load_end = bu.loadavg()
    trials = trial_times(work) if (work / "mlflow.db").exists() else []
    tw, tt = sum(t["wall_s"] for t in trials), sum(t["train_s"] for t in trials)
    sizes = {"runs": du(work / "runs"), "mlflow.db": du(work / "mlflow.db"), "mlartifacts": du(work / "mlartifacts")}
    headline = [l for l in lines if l.startswith("- **")]
    rec = {
        "command": COMMAND, "argv": argv[1:], "cwd": "a fresh temporary directory holding a copy of experiments/",
        "rc": rc, "wall_s": round(wall, 1), "first_trial_start_s": round(first_trial, 1) if first_trial else None,
        "trials": trials, "trial_wall_s": round(tw, 1), "trial_train_s": round(tt, 1),
        "trial_overhead_share": round((tw - tt) / tw, 3) if tw else None,
        "lines": len(lines), "bad_lines": [l for l in lines if BAD.search(l)][:20],
        "bytes": sizes, "bytes_total": sum(sizes.values()),
        "alone_final_test_acc": alone_accuracy(work) if rc == 0 else {},
        "headline": headline, "output": lines, "sources": [l for l in lines if l.startswith("source ")],
        "machine": m, "load_start": load_start, "load_end": load_end, "waited": waited,
        "targets": TARGETS, "wait_load": args.wait_load, "work": str(work) if args.keep else None,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    rec["adapter_params"] = adapter_sizes()
    return rec


def _mb(n: int) -> str:
    return f"{n / 1000**2:.1f} MB"


def render(r: dict) -> str:
    m = r["machine"]
    met = lambda ok: "met" if ok else "**NOT met**"  # noqa: E731
    ok_wall = r["rc"] == 0 and r["wall_s"] <= TARGETS["wall_s"]
    ok_lines = r["lines"] <= TARGETS["lines"] and not r["bad_lines"]
    ok_bytes = r["bytes_total"] <= TARGETS["bytes"]
    out = ["## Quickstart (`benchmarks/bench_quickstart.py`)", "",
           f"The README's main command, `{r['command']}`, in a fresh working directory (new local Ray, new MLflow "
           "sqlite store), as a new user runs it after `bash install.sh`.", ""]
    out += bu.machine_lines(m, r["load_start"], r["load_end"], r["waited"], r.get("wait_load", 1.0))[:-1]
    out += ["- the load at the end includes the command's own processes only if some were still exiting.", ""]
    out += ["| target | measured | |", "|---|---|---|",
            f"| wall time ≤ {TARGETS['wall_s'] / 60:.0f} min (Ray start-up included) | {r['wall_s'] / 60:.2f} min "
            f"({r['wall_s']:.0f} s; exit code {r['rc']}) | {met(ok_wall)} |",
            f"| console ≤ {TARGETS['lines']} lines, no error-level line / traceback / warning | {r['lines']} lines, "
            f"{len(r['bad_lines'])} such line(s) | {met(ok_lines)} |",
            f"| written ≤ {_mb(TARGETS['bytes'])} (runs/, mlflow.db, mlartifacts/) | {_mb(r['bytes_total'])} (runs/ "
            f"{_mb(r['bytes']['runs'])}, mlflow.db {_mb(r['bytes']['mlflow.db'])}, mlartifacts/ "
            f"{_mb(r['bytes']['mlartifacts'])}) | {met(ok_bytes)} |", ""]
    if r["bad_lines"]:
        out += ["Error-level / warning lines printed:", "", "```", *r["bad_lines"][:10], "```", ""]
    n = len(r["trials"])
    if n:
        share = r["trial_overhead_share"]
        out += [f"- {n} trials; first trial started {r['first_trial_start_s']} s after the command (config "
                "validation, MLflow store, Ray start-up).",
                f"- trial overhead share: Σ(trial wall − training time) / Σ trial wall = "
                f"({r['trial_wall_s']:.1f} − {r['trial_train_s']:.1f}) / {r['trial_wall_s']:.1f} s = "
                f"**{100 * share:.1f} %** (trial wall: the MLflow child run's start → end; training time: Σ "
                "`time/epoch_s` of its `metrics.jsonl`, training and evaluation).", ]
    for line in r.get("sources", []):  # the models the grid trains first (`sources:`), in the wall time above
        out.append(f"- {line.split(' -> ')[0]}{' (' + line.rsplit('(', 1)[1] if '(' in line else ''}")
    for pair, a in sorted(r["alone_final_test_acc"].items()):
        out.append(f"- `alone` target test accuracy (final epoch), pair `{pair}`: {100 * a['mean']:.1f} % "
                   f"(seeds: {', '.join(f'{100 * v:.1f}' for v in a['values'])})")
    for pair, n in sorted(r.get("adapter_params", {}).items()):
        out.append(f"- pair `{pair}`: MergeNet adapter {n['adapter']:,} trainable parameters, target model "
                   f"{n['target']:,} ({n['adapter'] / n['target']:.3g}× the target)")
    out += ["", "Report headline (the positive-control and verdict lines the run printed; a workflow demo at a "
            "tiny budget, not the study):", ""]
    out += r["headline"] or ["(no verdict lines printed)"]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wait-load", type=float, default=1.0, help="wait while the 1-min load average is above this")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for the load at most")
    ap.add_argument("--keep", metavar="DIR", help="run in DIR (emptied first) and keep it, instead of a temp dir")
    ap.add_argument("--echo", action="store_true", help="also echo the command's output while it runs")
    ap.add_argument("--json", default=str(bu.ROOT / "benchmarks" / "results" / "bench_quickstart.json"))
    ap.add_argument("--out", default=str(bu.ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--render-json", help="only rewrite the section from a --json dump")
    args = ap.parse_args()
    if args.render_json:
        rec = json.loads(Path(args.render_json).read_text())
        if "adapter_params" not in rec:  # sizes only (no timing): computed from the current configs
            rec["adapter_params"] = adapter_sizes()
            Path(args.render_json).write_text(json.dumps(rec, indent=1, default=str))
    else:
        rec = run(args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=1, default=str))
    bu.show(rec, render, args.out, SECTION, HEADER)
    return 0 if rec["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
