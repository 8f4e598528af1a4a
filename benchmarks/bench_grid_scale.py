#!/usr/bin/env python
"""Grid scale: what a grid costs as it grows from 100 to 1,000 tiny trials.

    python benchmarks/bench_grid_scale.py [--sizes 100 300 1000] [--backends sqlite server]
                                          [--server-sizes 100 300] [--concurrent 8]
                                          [--wait-load 1.0] [--keep DIR]

Per size and MLflow backend (``sqlite``: the embedded default, ``mlflow.db`` in the working
directory; ``server``: a local ``mlflow server`` on 127.0.0.1 with its own sqlite store), runs
``mergenet run GRID --no-report`` in a fresh working directory on a grid of one tiny pair (a
small CNN on 256 Fashion-MNIST images, 2 epochs of 2 steps) × the arms ``alone`` and
``mergenet`` × N/2 seeds, ``--concurrent`` trials at a time on a local Ray, then
``mergenet report GRID`` on it. Records:

- time to the first trial (the command's start to its first ``RUNNING`` line: validation,
  MLflow, Ray start-up, the tuner), the grid's wall time and trials per minute after the first
  trial started;
- the driver's peak RSS (``mergenet run``'s own process, polled every 0.5 s);
- the MLflow store's size (database and artifacts);
- the report's wall time (the whole ``mergenet report`` command);
- lost metrics: every metric point the trials reported (each trial's ``metrics.jsonl`` rows and
  ``final.json``, as ``mlflow_logging`` would log them) against the points in the MLflow store
  (counted in its database), and any MLflow error in the console;

and fits, per measure, the exponent b of ``measure ≈ a · N^b`` (least squares on log–log),
so "grows linearly" reads b ≈ 1. Writes ``benchmarks/results/bench_grid_scale.json`` and the
section "Grid scale" of ``docs/BENCHMARKS.md``. Nothing here is a test.
"""
from __future__ import annotations

import os

CLEAN_ENV = dict(os.environ)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _benchutil as bu  # noqa: E402

SECTION = "bench_grid_scale"
HEADER = "# Benchmarks\n"
#: counters, not metrics (orchestrator.tracking.NOT_METRICS)
COUNTERS = {"epoch", "epochs", "step", "steps"}
MLFLOW_ERROR = re.compile(r"MlflowException|database is locked|OperationalError|RestException")


def grid_yaml(n: int, concurrent: int) -> dict:
    task = {"name": "fashion_mnist", "options": {"train_subset": 256, "test_subset": 128, "val_fraction": 0.25}}
    cnn = {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}}
    return {
        "grid": f"scale-{n}",
        "base": {"device": "cpu", "recipe": {"epochs": 2, "batch_size": 32, "steps_per_epoch": 2,
                                             "eval_batch_size": 256}},
        "pairs": [{"name": "cnn-cnn", "source": {"model": cnn, "task": task}, "target": {"model": cnn, "task": task},
                   "layer_pairs": [{"source": "classifier.weight", "target": "classifier.weight", "rank": 2}]}],
        "methods": {"alone": {}, "mergenet": {"t_cycle": 1, "adapter": {"layers": 1, "heads": 2}}},
        "seeds": list(range(n // 2)),
        "max_concurrent_trials": concurrent,
        "keep_bundles": "none",
        "resources": {"cpus_per_worker": round(1.9 / concurrent, 3), "trial_driver_cpus": 0.01},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "mlartifacts"),
         "--workers", "2"],
        cwd=root, env=dict(CLEAN_ENV, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_cli(args: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``mergenet ARGS``; its wall time, the seconds to its first RUNNING line, peak RSS."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        peak, first = 0, None
        while proc.poll() is None:
            peak = max(peak, rss_kib(proc.pid))
            if first is None and " RUNNING " in log.read_text(errors="replace"):
                first = time.time() - t0
            time.sleep(0.5)
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "first_trial_s": first, "peak_rss_mib": peak / 1024}


def expected_points(grid_dir: Path) -> tuple[int, int]:
    """(trials, metric points) the trials reported: each metrics.jsonl row's numeric values and
    each final.json's (counters excluded)."""
    trials = points = 0
    for pair in grid_dir.glob("trials/*/pair"):
        trials += 1
        rows = [json.loads(l) for l in (pair / "metrics.jsonl").read_text().splitlines() if l.strip()]
        final = json.loads((pair / "final.json").read_text())
        for r in [*rows, final]:
            points += sum(1 for k, v in r.items() if k not in COUNTERS and isinstance(v, (int, float))
                          and not isinstance(v, bool) and not k.startswith("checkpoint/"))
    return trials, points


def stored_points(db: Path) -> tuple[int, int]:
    """(trial runs, metric points on them) in the MLflow database."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        runs = con.execute("select count(*) from tags where key = 'mergenet.trial' and value = '1'").fetchone()[0]
        pts = con.execute("select count(*) from metrics m join tags t on t.run_uuid = m.run_uuid "
                          "where t.key = 'mergenet.trial' and t.value = '1' "
                          "and m.key not like 'gain_vs_%'").fetchone()[0]
        return runs, pts
    finally:
        con.close()


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def one(n: int, backend: str, concurrent: int, keep: Path | None, log=print) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mergenet-scale-{n}-{backend}-"))
    server = None
    try:
        env = {k: v for k, v in CLEAN_ENV.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
        env["MERGENET_RAY_DASHBOARD"] = "0"
        if backend == "server":
            server, url = start_server(work)
            env["MLFLOW_TRACKING_URI"] = url
        (work / "grid.yaml").write_text(json.dumps(grid_yaml(n, concurrent), indent=1))  # JSON is YAML
        log(f"{n} trials, {backend}: running in {work}")
        run = run_cli(["run", "grid.yaml", "--no-report"], work, env, work / "run.log")
        console = (work / "run.log").read_text(errors="replace")
        rep = run_cli(["report", f"scale-{n}"], work, env, work / "report.log")
        db = work / "mlflow.db"
        grid_dir = work / "runs" / "grids" / f"scale-{n}"
        trials, expected = expected_points(grid_dir)
        runs, stored = stored_points(db)
        finished = len(re.findall(r" FINISHED ", console))
        grid_s = run["wall_s"] - (run["first_trial_s"] or 0)
        rec = {"n": n, "backend": backend, "rc": run["rc"], "report_rc": rep["rc"], "wall_s": run["wall_s"],
               "first_trial_s": run["first_trial_s"], "trials_per_min": 60 * trials / grid_s if grid_s > 0 else None,
               "driver_peak_rss_mib": run["peak_rss_mib"], "report_s": rep["wall_s"],
               "report_peak_rss_mib": rep["peak_rss_mib"], "store_mib": (du(db) + du(work / "mlartifacts")) / 2**20,
               "trial_folders": trials, "trial_runs": runs, "finished_lines": finished,
               "points_reported": expected, "points_stored": stored,
               "mlflow_errors": len(MLFLOW_ERROR.findall(console + (work / "report.log").read_text(errors="replace"))),
               "load_after": bu.loadavg()}
        log(json.dumps(rec))
        if run["rc"] != 0 or rep["rc"] != 0:
            log(console[-3000:])
        return rec
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        if keep:
            shutil.copytree(work, keep / work.name, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def exponent(ns: list[int], ys: list[float]) -> float | None:
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


MEASURES = (("first_trial_s", "time to first trial (s)"), ("wall_s", "grid wall (s)"),
            ("driver_peak_rss_mib", "driver peak RSS (MiB)"), ("store_mib", "MLflow store (MiB)"),
            ("report_s", "report (s)"))


def render(record: dict) -> str:
    lines = ["## Grid scale (`benchmarks/bench_grid_scale.py`)", "",
             *bu.machine_lines(record["machine"], record["load_start"], record["load_end"], record["waited"],
                               record["threshold"]), "",
             *[f"- a later sitting ({x['machine']['date']}, git {x['machine']['git']}, `{x['machine']['command']}`): "
               f"load average at start {x['load_start'][0]:.2f}, at end {x.get('load_end', [float('nan')])[0]:.2f}"
               for x in record.get("sittings", [])[1:]],
             "",
             f"One tiny pair (CNN → CNN, 256 Fashion-MNIST training images, 2 epochs × 2 steps) × `alone`, "
             f"`mergenet` × N/2 seeds, {record['concurrent']} trials at a time on a local Ray with 2 CPUs; "
             "`mergenet run --no-report`, then `mergenet report`.", "",
             *bu.table(["N", "MLflow", "first trial (s)", "grid wall (s)", "trials/min", "driver peak RSS (MiB)",
                        "store (MiB)", "report (s)", "metric points reported / stored", "MLflow errors", "rc"],
                       [[r["n"], r["backend"], f"{r['first_trial_s'] or float('nan'):.1f}", f"{r['wall_s']:.0f}",
                         f"{r['trials_per_min'] or float('nan'):.1f}", f"{r['driver_peak_rss_mib']:.0f}",
                         f"{r['store_mib']:.1f}", f"{r['report_s']:.1f}",
                         f"{r['points_reported']} / {r['points_stored']}", r["mlflow_errors"],
                         f"{r['rc']}/{r['report_rc']}"] for r in record["runs"]]), ""]
    for backend in sorted({r["backend"] for r in record["runs"]}):
        rs = sorted((r for r in record["runs"] if r["backend"] == backend), key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        ns = [r["n"] for r in rs]
        fits = [f"{title} b = {b:.2f}" for key, title in MEASURES
                if (b := exponent(ns, [r[key] or 0 for r in rs])) is not None]
        lines.append(f"- scaling exponents (measure ≈ a · N^b), {backend}: " + "; ".join(fits))
    big = [r for r in record["runs"] if r["n"] >= 1000]
    for r in big:
        lines.append(f"- report of {r['n']} trials ({r['backend']}): {r['report_s']:.1f} s — target ≤ 30 s "
                     f"{'met' if r['report_s'] <= 30 else 'NOT met'}")
    lost = [r for r in record["runs"] if r["points_stored"] < r["points_reported"] or r["mlflow_errors"]]
    lines.append("- lost metrics / MLflow write errors: " + ("none" if not lost else
                 "; ".join(f"N={r['n']} {r['backend']}: {r['points_reported'] - r['points_stored']} points missing, "
                           f"{r['mlflow_errors']} errors" for r in lost)))
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--backends", nargs="+", default=["sqlite", "server"], choices=["sqlite", "server"])
    p.add_argument("--server-sizes", type=int, nargs="+", default=None,
                   help="sizes for the server backend (default: --sizes)")
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--wait-load", type=float, default=1.0)
    p.add_argument("--max-wait", type=float, default=600.0)
    p.add_argument("--keep", type=Path, default=None, help="copy each run's working directory here")
    p.add_argument("--out", default=str(bu.ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--json", default=str(bu.ROOT / "benchmarks" / "results" / "bench_grid_scale.json"))
    p.add_argument("--render-json", default=None, help="only rewrite the section from a --json dump")
    p.add_argument("--merge", action="store_true",
                   help="add to the runs already in --json (a run of the same N and backend is replaced)")
    args = p.parse_args()
    if args.render_json:
        bu.show(json.loads(Path(args.render_json).read_text()), render, args.out, SECTION, HEADER)
        return 0
    waited = bu.wait_for_load(args.wait_load, args.max_wait)
    t0, load_start = time.time(), bu.loadavg()
    runs = []
    record = {"machine": bu.machine_record(), "load_start": load_start, "waited": waited,
              "threshold": args.wait_load, "concurrent": args.concurrent, "runs": runs}
    if args.merge and Path(args.json).exists():  # an earlier sitting's runs; its machine lines stay
        old = json.loads(Path(args.json).read_text())
        record = {**old, "runs": runs, "sittings": [*old.get("sittings", [{k: old[k] for k in (
            "machine", "load_start", "load_end", "waited") if k in old}])]}
        runs += [r for r in old["runs"] if (r["n"], r["backend"]) not in
                 {(n, b) for n in set(args.sizes) | set(args.server_sizes or []) for b in args.backends}]
        record["sittings"].append({"machine": bu.machine_record(), "load_start": load_start, "waited": waited})
    todo = [(n, b) for n in sorted(set(args.sizes) | set(args.server_sizes or [])) for b in args.backends
            if n in (args.server_sizes or args.sizes if b == "server" else args.sizes)]
    for n, backend in todo:
        runs.append(one(n, backend, args.concurrent, args.keep))
        if "sittings" in record:  # the first sitting's machine lines stay as they were
            record["sittings"][-1].update(load_end=bu.loadavg(), wall_s=time.time() - t0)
        else:
            record.update(load_end=bu.loadavg(), wall_s=time.time() - t0)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))  # partial results survive
    bu.publish(record, render, args, SECTION, HEADER, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
