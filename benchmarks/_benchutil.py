"""Helpers shared by the benchmark scripts: machine record, load wait, Markdown sections.

Nothing here asserts on timings: benchmarks measure and write, tests never read them.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import git_rev, write_section  # noqa: E402,F401  (stdlib only; gpu_suite.py uses them too)

#: one intra-op thread per process: on a shared 2-core box torch's OpenMP pool stalls
#: badly under oversubscription; the Ray workers (1 CPU each) get 1 thread from Ray anyway
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MERGENET_RAY_DASHBOARD", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def machine_record() -> dict:
    import ray
    import torch

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {"nproc": nproc, "cpu": cpu_model(), "ram_gib": ram_gib(), "torch": torch.__version__,
            "ray": ray.__version__, "python": platform.python_version(), "git": git_rev(),
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}


def wait_for_load(threshold: float, max_wait_s: float, poll_s: float = 60.0, log=print) -> list[tuple[str, float]]:
    """Poll the 1-minute load average until it is <= ``threshold`` or ``max_wait_s`` passed.

    Returns what was seen ``[(HH:MM:SS, load1), ...]``; the caller runs anyway afterwards.
    """
    seen = []
    deadline = time.time() + max_wait_s
    while True:
        l1 = loadavg()[0]
        seen.append((time.strftime("%H:%M:%S"), l1))
        if l1 <= threshold or time.time() >= deadline:
            return seen
        log(f"load average {l1:.2f} > {threshold:g}: waiting {poll_s:.0f} s "
            f"({max(0, deadline - time.time()):.0f} s of waiting left)")
        time.sleep(min(poll_s, max(1.0, deadline - time.time())))


def machine_lines(m: dict, load_start, load_end, waited: list[tuple[str, float]], threshold: float) -> list[str]:
    lines = [
        f"- date: {m['date']}; git: {m['git']}",
        f"- command: `{m['command']}`",
        f"- machine: {m['nproc']} CPU cores ({m['cpu']}), {m['ram_gib']:.1f} GiB RAM, no GPU; "
        f"python {m['python']}, torch {m['torch']}, ray {m['ray']}",
        f"- load average (1/5/15 min) at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, "
        f"at end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}",
    ]
    if len(waited) > 1:
        lines.append(f"- waited for the 1-min load to fall to ≤ {threshold:g}: "
                     + ", ".join(f"{t} {l:.1f}" for t, l in waited))
    n = m["nproc"]
    if load_start[0] > n:
        lines.append(f"- **the machine was shared**: other jobs kept the 1-min load at {load_start[0]:.1f} when the "
                     f"measurements began, above the {n} cores, so absolute times are inflated and noisy; ratios "
                     "measured in this same run are the figures to read, and even they carry the noise shown by "
                     "the spreads.")
    elif load_start[0] > 0.5 * n:
        lines.append(f"- the machine was partly busy when the measurements began (1-min load {load_start[0]:.1f} on "
                     f"{n} cores): absolute times carry some noise from other jobs.")
    else:
        lines.append(f"- the machine was nearly idle when the measurements began (1-min load {load_start[0]:.1f}).")
    lines.append("- the load at the end includes this script's own processes (Ray workers, adapter actor).")
    return lines


def add_run_args(p, json_help: str) -> None:
    """The options every benchmark script takes: local Ray size, load wait, JSON dump and re-render."""
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray (the pair needs 2)")
    p.add_argument("--wait-load", type=float, default=3.0, help="wait while the 1-min load average is above this")
    p.add_argument("--max-wait", type=float, default=900.0, help="seconds to wait for the load at most")
    p.add_argument("--json", default=None, help=json_help)
    p.add_argument("--render-json", default=None, help="only rewrite the section from a --json dump of a run")


def show(record: dict, render, out: str | Path, name: str, header: str) -> None:
    """Render ``record`` into section ``name`` of ``out`` and print it."""
    body = render(record)
    write_section(out, name, body, header)
    print(body)


def publish(record: dict, render, args, name: str, header: str, log) -> None:
    """Dump ``record`` to ``--json`` (if given), render it into section ``name`` of ``--out``, print it."""
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    show(record, render, args.out, name, header)
    log(f"wrote {args.out} (section {name}) in {record['wall_s'] / 60:.1f} min")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def fashion_task(train_subset: int, test_subset: int, val_fraction: float = 0.1) -> dict:
    """Fashion-MNIST as the offline CIFAR stand-in: 32×32, grey repeated to 3 channels."""
    return {"name": "fashion_mnist", "options": {"image_size": 32, "channels": 3, "train_subset": train_subset,
                                                 "test_subset": test_subset, "val_fraction": val_fraction}}


#: the small benchmark pair: ResNet-18 (width 16) -> MobileNetV2 (x0.35), a learned rank-4 pair
#: from a late source conv (64x64x3x3: A_s 4x576) into a late target 1x1 projection (56x336: A_t 4x336)
PAIR_LAYER = {"source": "layer3.1.conv2.weight", "target": "features.16.project.conv.weight",
              "mode": "learned", "rank": 4}


def pair_config(*, t_cycle: int, epochs: int, steps_per_epoch: int, seed: int = 0, train_subset: int = 4000,
                test_subset: int = 1000, val_fraction: float = 0.1, batch_size: int = 64, eval_every: int = 1,
                ray: dict | None = None, name: str = "bench-r18-mbv2") -> dict:
    task = fashion_task(train_subset, test_subset, val_fraction)
    return {
        "name": name, "seed": seed, "device": "cpu",
        "source": {"model": {"name": "resnet18", "options": {"width": 16}}, "task": task},
        "target": {"model": {"name": "mobilenetv2", "options": {"width_mult": 0.35}}, "task": task},
        "recipe": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                   "schedule": {"name": "cosine"}, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                   "batch_size": batch_size, "eval_batch_size": 500, "eval_every": eval_every},
        "method": {"name": "mergenet", "options": {"t_cycle": t_cycle, "update_rule": "delta", "layer_pairs": [dict(PAIR_LAYER)]}},
        "ray": {"source_workers": 1, "target_workers": 1, "cpus_per_worker": 1.0, **(ray or {})},
    }


def start_ray(num_cpus: int, object_store_mib: int = 1024) -> None:
    import ray

    from orchestrator.cluster.connect import WORKER_ENV

    if ray.is_initialized():
        return
    env = {**WORKER_ENV, **{k: os.environ[k] for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mib * 1024**2, runtime_env={"env_vars": env})
