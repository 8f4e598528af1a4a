"""Wall time of ``mergenet validate`` (fast by default, ``--deep`` for comparison), as the user
runs it: a fresh ``python -m orchestrator.cli validate ...`` process per measurement.

    python benchmarks/bench_validate.py [--quick] [--repeats 5] [--out docs/BENCHMARKS.md]

Measured, in one run on this machine (issue #12 item 6 asks ≤ 3 s for one file, ≤ 0.5 s for
each further file):

1. the floor: ``python -c "import torch"``;
2. one file, for each of a pair config (image), a pair config (text, MiniLM-L6) and the
   quickstart grid (its pairs × arms × seeds counted from the file when the benchmark runs);
3. all of them in one command (N files): the cost of each further file is
   ``(t_N - t_first) / (N - 1)`` with ``t_first`` the one-file time of the first file;
4. ``--deep`` (the full pair build) for the same one-file cases, once each (``--skip-deep``
   leaves it out).

Median and max over ``--repeats`` fresh processes, the cases interleaved. Writes
``benchmarks/results/bench_validate.json`` and the section between
``<!-- bench_validate:start -->`` and ``<!-- bench_validate:end -->`` of ``--out``. Nothing
here is a test assertion.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402  (sets thread/env defaults)

from bench_pair import HEADER  # noqa: E402

SECTION = "bench_validate"
RESULTS = bu.ROOT / "benchmarks" / "results" / "bench_validate.json"

#: (label, files relative to the repository root); every one validates (exit 0)
ONE_FILE = [
    ("pair, image (ResNet-18 → MobileNetV2, Fashion-MNIST)", ["experiments/fmnist_pair.yaml"]),
    ("pair, text (MiniLM-L6, Rotten Tomatoes)", ["experiments/study/rt_source.yaml"]),
    ("grid: quickstart", ["experiments/quickstart.yaml"]),
]


def _grid_label(label: str, files: list[str]) -> str:
    """A grid's label with its shape read from the file now (a hand-written shape drifts)."""
    if not label.startswith("grid:"):
        return label
    from mergenet_core.config import read_yaml

    g = read_yaml(bu.ROOT / files[0])
    return f"{label} ({len(g['pairs'])} pairs × {len(g['methods'])} arms × {len(g['seeds'])} seeds)"


ONE_FILE = [(_grid_label(label, files), files) for label, files in ONE_FILE]
ALL_FILES = ["experiments/fmnist_pair.yaml", "experiments/study/rt_source.yaml", "experiments/quickstart.yaml",
             "experiments/results_fmnist.yaml", "experiments/study/fmnist_source.yaml"]


def _env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    env.pop("PYTHONPATH", None)
    env["PYTHONPATH"] = str(bu.ROOT)  # this checkout's code, whatever is installed
    return env


def timed(cmd: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=bu.ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    return time.perf_counter() - t0, proc.returncode, proc.stderr.strip()[-300:]


def validate_cmd(files: list[str], deep: bool = False) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "validate", *(["--deep"] if deep else []), *files]


#: the same command inside one process, timed after the imports: what validation itself costs
#: beyond starting Python and importing torch (the part that grows with the files)
IN_PROCESS = ("import sys, time\n"
              "import torch, orchestrator.cli, mergenet_core.config\n"
              "t0 = time.perf_counter()\n"
              "rc = orchestrator.cli.main(['validate', *sys.argv[1:]])\n"
              "print(f'CHECK_S {time.perf_counter() - t0:.4f}', file=sys.stderr)\n"
              "sys.exit(rc)\n")


def check_time(files: list[str]) -> float:
    proc = subprocess.run([sys.executable, "-c", IN_PROCESS, *files], cwd=bu.ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{files}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return float(next(l for l in proc.stderr.splitlines() if l.startswith("CHECK_S")).split()[1])


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "max": max(xs), "min": min(xs), "n": len(xs), "all": xs}


def run(args, log) -> dict:
    cases = [("import torch (floor)", [sys.executable, "-c", "import torch"])]
    cases += [(label, validate_cmd(files)) for label, files in ONE_FILE]
    cases.append((f"all {len(ALL_FILES)} files in one command", validate_cmd(ALL_FILES)))
    times: dict[str, list[float]] = {label: [] for label, _ in cases}
    inside: dict[str, list[float]] = {label: [] for label, _ in ONE_FILE}
    inside[cases[-1][0]] = []
    timed(validate_cmd(ALL_FILES))  # warm the page cache (data files, packages) once, not measured
    for rep in range(args.repeats):
        for label, cmd in cases:
            s, rc, err = timed(cmd)
            if rc != 0:
                raise SystemExit(f"{label}: exit {rc}: {err}")
            times[label].append(s)
        for label, files in [*ONE_FILE, (cases[-1][0], ALL_FILES)]:
            inside[label].append(check_time(files))
        log(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{times[l][-1]:.2f}" for l, _ in cases))
    deep = {}
    if not args.skip_deep:
        for label, files in ONE_FILE:
            s, rc, err = timed(validate_cmd(files, deep=True))
            if rc != 0:
                raise SystemExit(f"--deep {label}: exit {rc}: {err}")
            deep[label] = s
            log(f"--deep {label}: {s:.1f} s")
    first = statistics.median(times[ONE_FILE[0][0]])
    n_all = statistics.median(times[cases[-1][0]])
    return {"cases": {label: _stats(t) for label, t in times.items()}, "deep": deep,
            "in_process": {label: _stats(t) for label, t in inside.items()},
            "files": {label: files for label, files in ONE_FILE}, "all_files": ALL_FILES,
            "per_further_file": (n_all - first) / (len(ALL_FILES) - 1)}


def render(rec: dict) -> str:
    m = rec["machine"]
    lines = ["## `mergenet validate`: fast by default, `--deep` for the full build", ""]
    lines += bu.machine_lines(m, rec["load_start"], rec["load_end"], rec["waited"], rec["args"]["wait_load"])[:-1]
    lines += [f"- each figure: a fresh `python -m orchestrator.cli validate ...` process (`OMP_NUM_THREADS=1`), "
              f"median and max of {rec['args']['repeats']} repeats, the cases interleaved, after one unmeasured "
              "run that warms the page cache", ""]
    rows = []
    for label, s in rec["cases"].items():
        deep = rec["deep"].get(label)
        ins = rec.get("in_process", {}).get(label)
        rows.append([label, f"{s['median']:.2f}", f"{s['max']:.2f}", f"{ins['median']:.2f}" if ins else "–",
                     f"{deep:.1f}" if deep is not None else "–"])
    lines += bu.table(["command", "fast: median s", "fast: max s", "fast, after the imports: median s",
                       "`--deep`: s (once)"], rows)
    lines += ["", "- *after the imports*: the same command timed inside one process once torch and the CLI are "
                  "imported (what validation itself costs, beyond the interpreter and torch start-up)",
              f"- each further file (from the {len(rec['all_files'])}-file command: (t_N − t_first) / (N − 1), "
                  f"t_first = the image pair alone): **{rec['per_further_file']:.2f} s**",
              f"- files: {', '.join('`' + f + '`' for f in rec['all_files'])}",
              "- goal (issue #12 item 6): one file ≤ 3 s, each further file ≤ 0.5 s. The fast path checks data by "
              "file presence and headers and builds the models on the meta device (no weights, no transformers "
              "import); `--deep` decodes the data, loads pretrained weights and builds the adapters."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 repeats, no --deep (a smoke run, under a minute)")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per case (default 5; --quick 2)")
    p.add_argument("--skip-deep", action="store_true", help="leave out the --deep comparison")
    p.add_argument("--out", default=str(bu.ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--json", default=str(RESULTS), help="where the raw record goes")
    p.add_argument("--wait-load", type=float, default=1.0, help="wait while the 1-min load average is above this")
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for the load at most")
    p.add_argument("--render-json", default=None, help="only rewrite the section from a JSON record")
    args = p.parse_args(argv)
    if args.render_json:
        bu.show(json.loads(Path(args.render_json).read_text()), render, args.out, SECTION, HEADER)
        return 0
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.skip_deep = args.skip_deep or args.quick

    def log(msg):
        print(f"[bench_validate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    waited = bu.wait_for_load(args.wait_load, args.max_wait, log=log)
    load0 = bu.loadavg()
    t0 = time.time()
    rec = run(args, log)
    rec.update({"machine": bu.machine_record(), "load_start": load0, "load_end": bu.loadavg(), "waited": waited,
                "args": vars(args), "wall_s": time.time() - t0})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rec, indent=1, default=str))
    bu.publish(rec, render, argparse.Namespace(json=None, out=args.out), SECTION, HEADER, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
