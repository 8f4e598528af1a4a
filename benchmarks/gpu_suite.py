"""The GPU suite: the core (engine, adapter, models; pure PyTorch) on one CUDA GPU, in one command.

    python benchmarks/gpu_suite.py                 # on the GPU machine (about 3 minutes)
    python benchmarks/gpu_suite.py --dry-run       # anywhere: device cpu, tiny shapes, a few steps

Three parts, each a section of the JSON result (``--json``) and of ``docs/BENCHMARKS.md``
(``--out``, between the ``gpu_suite`` markers):

1. ``cuda_path``: an image pair through the engine on CUDA in fp32, bf16 autocast and
   ``channels_last``; every metric finite; fp32 run twice (TF32 convolutions and
   non-deterministic cuDNN kernels are on by default) against the stated tolerance.
2. ``throughput``: an authors-style plain PyTorch loop (ResNet-50 -> MobileNetV2 at CIFAR-100
   shape, batch 128, the full-matrix pairing 160x960 <- 100x2048, L = 2, h = 8, t_cycle 1)
   against the engine on the same pair in the same run: pair steps per second, the adapter's
   share of the step and the engine / plain ratio; the engine also with the source and target
   steps on separate CUDA streams (``Engine(role_streams=True)``) and with the adapter under
   bf16 autocast (``method.options.adapter.precision: bf16``).
3. ``packing``: the same small pair in 1, 2, 4 and 8 concurrent engine processes on the GPU:
   pairs per hour and peak memory per process, and the packing factor where throughput stops rising.

Only torch, pydantic and PyYAML are needed (no Ray, MLflow or transformers is imported on this
path; the data is the registered ``synthetic_images`` task, so no data set either). The GPU
machine lacks pydantic: the wheels travel in ``benchmarks/gpu_wheels/`` (git-ignored), fetched
once on a machine with PyPI (docs/BENCHMARKS.md, "GPU suite"); the suite unpacks them at start
and prints what is missing instead of a traceback. CUDA-only branches print a ``skipped`` line
(and are listed under ``skipped`` in the JSON) on a CPU, never silently.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sections import git_rev, write_section  # noqa: E402  (stdlib only: no environment defaults)
WHEELS = ROOT / "benchmarks" / "gpu_wheels"
SITE = WHEELS / "site"  # the wheels unpacked (also git-ignored)
#: import name -> distribution, for what the suite needs beyond the standard library
REQUIRED = {"torch": "torch", "pydantic": "pydantic", "pydantic_core": "pydantic-core",
            "annotated_types": "annotated-types", "typing_extensions": "typing-extensions",
            "typing_inspection": "typing-inspection", "yaml": "PyYAML"}
#: never imported on the suite's path (the test suite checks the JSON's ``imported_banned``)
BANNED = ("ray", "mlflow", "transformers")
FETCH = ("pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 "
         "--implementation cp -d benchmarks/gpu_wheels pydantic==2.14.4 pydantic-core==2.50.5 "
         "annotated-types==0.8.0 typing-extensions==4.16.0 typing-inspection==0.4.5 PyYAML==6.0.4")
SECTION = "gpu_suite"  # docs/BENCHMARKS.md's <!-- gpu_suite:start/end --> markers
#: the stated equality tolerance of two runs of one config (docs/RELIABILITY.md: 1e-5)
TOL = 1e-5
#: "a pair" for pairs per hour: a run of this many pair steps (e.g. 20 epochs x 50 steps)
PAIR_STEPS = 1000


# --------------------------------------------------------------------------- wheels and imports

def missing_modules(names=None) -> list[str]:
    """The import names among ``names`` (default: :data:`REQUIRED`) that cannot be found
    (nothing is imported)."""
    return [n for n in (REQUIRED if names is None else names) if importlib.util.find_spec(n) is None]


def use_carried_wheels(wheels: Path = WHEELS, site: Path = SITE, names=None) -> list[str]:
    """When a needed module is missing here, unpack the carried wheels (a wheel is a zip of an
    importable tree, compiled extensions included) into ``site`` once and put it first on
    ``sys.path``; returns the wheels used."""
    if not missing_modules(names) or not wheels.is_dir():
        return []
    found = sorted(wheels.glob("*.whl"))
    stamp = site / ".unpacked"
    names = "\n".join(w.name for w in found)
    if not stamp.is_file() or stamp.read_text() != names:
        site.mkdir(parents=True, exist_ok=True)
        for w in found:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
        stamp.write_text(names)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return [w.name for w in found]


def requirements_report(missing: list[str]) -> str:
    dists = " ".join(sorted({REQUIRED.get(m, m) for m in missing}))
    return (f"gpu_suite: missing Python packages: {dists}\n"
            f"  fetch them once on a machine with PyPI, from the repository root:\n    {FETCH}\n"
            f"  then carry benchmarks/gpu_wheels with the working tree; the suite unpacks them at start")


def check_requirements() -> list[str]:
    """Unpack the carried wheels if needed; print what is still missing and exit 3."""
    used = use_carried_wheels()
    missing = missing_modules()
    if missing:
        print(requirements_report(missing), file=sys.stderr, flush=True)
        raise SystemExit(3)
    return used


# --------------------------------------------------------------------------- configs

def image_task(dry: bool, classes: int) -> dict:
    if dry:
        return {"name": "synthetic_images",
                "options": {"num_classes": classes, "train_size": 256, "test_size": 64, "image_size": 16}}
    return {"name": "synthetic_images", "options": {"num_classes": classes, "train_size": 20_000,
                                                    "test_size": 2_000}}


def pair_config(dry: bool, *, name: str, source: dict, target: dict, layer: dict, classes: int, batch: int,
                steps: int, epochs: int = 1, adapter: dict | None = None, t_cycle: int = 1,
                precision: str = "fp32", channels_last: bool = False, device: str = "cuda") -> dict:
    task = image_task(dry, classes)
    return {
        "name": name, "seed": 0, "device": device, "precision": precision, "channels_last": channels_last,
        "source": {"model": source, "task": task}, "target": {"model": target, "task": task},
        "recipe": {"epochs": epochs, "steps_per_epoch": steps, "batch_size": batch, "eval_batch_size": 512,
                   "optimizer": {"name": "sgd", "lr": 0.05}},
        "method": {"name": "mergenet", "options": {
            "t_cycle": t_cycle, "layer_pairs": [layer],
            "adapter": {"preset": "authors", **(adapter or {})}}},
    }


def small_pair(dry: bool, **kw) -> dict:
    """The small pair of the CUDA-path and packing parts: ResNet-18 (width 16) -> MobileNetV2
    (x0.35) at CIFAR-10 shape, one late-layer pair (learned rank 4), adapter L = 2, h = 8."""
    return pair_config(dry, name=kw.pop("name", "small"),
                       source={"name": "resnet18", "options": {"width": 8 if dry else 16}},
                       target={"name": "mobilenetv2", "options": {"width_mult": 0.25 if dry else 0.35}},
                       layer={"source": "layer4.1.conv2.weight", "target": "features.16.project.conv.weight",
                              "mode": "learned", "rank": 4},
                       classes=10, batch=kw.pop("batch", 16 if dry else 64), **kw)


def authors_pair(dry: bool, **kw) -> dict:
    """The authors' CIFAR-100 pair: ResNet-50 -> MobileNetV2, ``fc.weight`` (100x2048) into
    ``features.16.project`` (160x960) as full matrices, batch 128 (dry: tiny widths, 10 classes)."""
    return pair_config(dry, name=kw.pop("name", "authors"),
                       source={"name": "resnet50", "options": {"width": 4 if dry else 64}},
                       target={"name": "mobilenetv2", "options": {"width_mult": 0.25 if dry else 1.0}},
                       layer={"source": "fc.weight", "target": "features.16.project.conv.weight", "mode": "full"},
                       classes=10 if dry else 100, batch=16 if dry else 128, **kw)


# --------------------------------------------------------------------------- helpers

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finite(record: dict) -> bool:
    return all(math.isfinite(v) for v in record.values() if isinstance(v, (int, float)) and not isinstance(v, bool))


def engine_for(data: dict, out: Path, **kw):
    from mergenet_core.config.checks import parse_config
    from mergenet_core.config import ExperimentConfig
    from mergenet_core.training.engine import Engine

    return Engine(parse_config(data, ExperimentConfig), out, progress=False, **kw)


def timed_steps(step, n: int, warmup: int, device) -> float:
    """Seconds per call of ``step(k)`` over ``n`` calls after ``warmup`` calls (device synced)."""
    for k in range(warmup):
        step(k)
    sync(device)
    t0 = time.perf_counter()
    for k in range(warmup, warmup + n):
        step(k)
    sync(device)
    return (time.perf_counter() - t0) / n


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- 1. CUDA path

def part_cuda_path(args, device, tmp: Path, skipped: list[str]) -> dict:
    """The small pair through the engine (2 epochs, evaluation included): fp32 twice, bf16
    autocast, channels_last (fp32 and bf16); every record finite; the two fp32 runs compared."""
    steps, epochs = (2, 1) if args.dry_run else (40, 2)
    variants = [("fp32", "fp32", False), ("fp32 again", "fp32", False), ("channels_last", "fp32", True),
                ("bf16", "bf16", False), ("bf16 + channels_last", "bf16", True)]
    runs = {}
    for label, precision, cl in variants:
        if precision == "bf16" and device.type != "cuda":
            skip(skipped, f"cuda_path {label}: bf16 autocast needs CUDA (the config refuses bf16 on a CPU)")
            continue
        data = small_pair(args.dry_run, name=label.replace(" ", "_").replace("+", "and"), steps=steps,
                          epochs=epochs, precision=precision, channels_last=cl, device=device.type)
        t0 = time.perf_counter()
        final = engine_for(data, tmp / f"cuda-{len(runs)}").run()
        records = [json.loads(l) for l in (tmp / f"cuda-{len(runs)}" / "metrics.jsonl").read_text().splitlines()]
        runs[label] = {"seconds": round(time.perf_counter() - t0, 2), "finite": all(map(finite, records)),
                       "target_test_acc": final.get("target/final_test_acc"), "records": records}
        print(f"  cuda_path {label}: finite={runs[label]['finite']} "
              f"target test acc {final.get('target/final_test_acc')}", flush=True)
    a, b = runs["fp32"]["records"], runs["fp32 again"]["records"]
    diffs = {k: abs(ra[k] - rb[k]) for ra, rb in zip(a, b) for k in ra
             if isinstance(ra[k], float) and "time" not in k and not k.endswith(("_ms", "_s"))}
    worst = max(diffs.items(), key=lambda kv: kv[1]) if diffs else ("", 0.0)
    for r in runs.values():
        r.pop("records")
    import torch

    return {"runs": runs, "all_finite": all(r["finite"] for r in runs.values()),
            "fp32_repeat": {"max_abs_diff": worst[1], "metric": worst[0], "tolerance": TOL,
                            "within": worst[1] <= TOL},
            "settings": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                         "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn.benchmark": torch.backends.cudnn.benchmark,
                         "cudnn.deterministic": torch.backends.cudnn.deterministic}}


# --------------------------------------------------------------------------- 2. throughput

class PlainLoop:
    """The authors-style loop, written plainly: two models, two SGD optimisers, one adapter with
    AdamW; per step: the adapter writes a new target matrix from (target, source) matrices, the
    source and the target take their supervised steps, and the adapter learns from the delta
    rule (the written matrix minus the target's matrix after its step). The same models, adapter
    class, data (the same synthetic task, batches moved to the device and augmented by the core's
    ``prepare_images``) and hyper-parameters as the engine's config; none of the engine's
    per-role RNG streams, records, diagnostics or checks."""

    def __init__(self, data: dict, device, transfer: bool = True):
        import torch

        from mergenet_core.data import build_task
        from mergenet_core.methods.mergenet.adapter import ParameterAdapter
        from mergenet_core.methods.mergenet.options import AdapterOptions
        from mergenet_core.models import build_model

        self.device, self.transfer = device, transfer
        task = build_task(data["target"]["task"]["name"], data["target"]["task"]["options"], seed=0)
        self.info, self.x, self.y = task.info, task.train.x, task.train.y
        self.batch = data["recipe"]["batch_size"]
        self.cl = data["channels_last"]
        torch.manual_seed(0)
        fmt = torch.channels_last if self.cl else torch.contiguous_format
        self.src = build_model(data["source"]["model"]["name"], data["source"]["model"]["options"], task.info)
        self.tgt = build_model(data["target"]["model"]["name"], data["target"]["model"]["options"], task.info)
        self.src.to(device, memory_format=fmt)
        self.tgt.to(device, memory_format=fmt)
        lr = data["recipe"]["optimizer"]["lr"]
        self.opt_s = torch.optim.SGD(self.src.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        self.opt_t = torch.optim.SGD(self.tgt.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        layer = data["method"]["options"]["layer_pairs"][0]
        self.w_s = dict(self.src.named_parameters())[layer["source"]]
        self.w_t = dict(self.tgt.named_parameters())[layer["target"]]
        a = AdapterOptions(**data["method"]["options"]["adapter"])
        p, q = self.w_t.shape[0], self.w_t[0].numel()
        P, Q = self.w_s.shape[0], self.w_s[0].numel()
        self.adapter = ParameterAdapter((p, q), (P, Q), a.layers, a.heads, *a.dropouts, "rms", combine=a.combine,
                                        gelu=a.gelu, ln_eps=a.ln_eps).to(device)
        self.opt_a = torch.optim.AdamW(self.adapter.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        self.clip = a.grad_clip
        self.gen = torch.Generator(device=device).manual_seed(1)
        self.order = torch.randperm(len(self.y))
        self.pos = 0

    def _batch(self):
        import torch

        from mergenet_core.data import prepare_images

        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.y)), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        x = prepare_images(self.x[idx].to(self.device, non_blocking=True), self.info, True, self.gen)
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.y[idx].to(self.device, non_blocking=True)

    def step(self, k: int) -> None:
        import torch
        import torch.nn.functional as F

        new = None
        if self.transfer:
            x_t = self.w_t.detach().reshape(self.w_t.shape[0], -1).clone()  # the steps below change
            y_s = self.w_s.detach().reshape(self.w_s.shape[0], -1).clone()  # both weights in place
            self.adapter.train()
            new = self.adapter(x_t, y_s)
            with torch.no_grad():
                self.w_t.copy_(new.detach().reshape(self.w_t.shape))
        for model, opt in ((self.src, self.opt_s), (self.tgt, self.opt_t)):
            x, y = self._batch()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if new is not None:  # delta rule: d(loss)/d(new) := new - W_after
            self.opt_a.zero_grad(set_to_none=True)
            new.backward(new.detach() - self.w_t.detach().reshape(new.shape))
            torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.clip)
            self.opt_a.step()


def part_throughput(args, device, tmp: Path, skipped: list[str]) -> dict:
    n, warm = (2, 1) if args.dry_run else (args.steps, 8)
    total = n + warm + 2
    rows = {}

    def measure(label: str, make, extra: dict | None = None) -> None:
        runner = make()
        sec = timed_steps(runner.step, n, warm, device)
        rows[label] = {"ms_per_step": round(1000 * sec, 3), "pair_steps_per_s": round(1 / sec, 3), **(extra or {})}
        print(f"  throughput {label}: {1000 * sec:.2f} ms / pair step", flush=True)
        del runner

    cfg = lambda **kw: authors_pair(args.dry_run, steps=total, device=device.type, **kw)  # noqa: E731
    measure("plain", lambda: PlainLoop(cfg(), device))
    measure("plain, no transfer", lambda: PlainLoop(cfg(), device, transfer=False))
    measure("engine", lambda: engine_for(cfg(), tmp / "tp-engine"))
    measure("engine, no transfer", lambda: engine_for(cfg(t_cycle=10**6), tmp / "tp-engine-off"))
    if device.type == "cuda":
        measure("engine, role streams", lambda: engine_for(cfg(), tmp / "tp-streams", role_streams=True))
        measure("engine, adapter bf16", lambda: engine_for(cfg(adapter={"precision": "bf16"}), tmp / "tp-bf16"))
        measure("engine, role streams + adapter bf16",
                lambda: engine_for(cfg(adapter={"precision": "bf16"}), tmp / "tp-both", role_streams=True))
    else:
        skip(skipped, "throughput role streams / adapter bf16: CUDA only (on a CPU both are the plain engine)")

    def share(on: str, off: str) -> float:
        return round(1 - rows[off]["ms_per_step"] / rows[on]["ms_per_step"], 4)

    plain = rows["plain"]["pair_steps_per_s"]
    for label, r in rows.items():
        r["ratio_to_plain"] = round(r["pair_steps_per_s"] / plain, 3)
    best = max((l for l in rows if l.startswith("engine") and "no transfer" not in l),
               key=lambda l: rows[l]["pair_steps_per_s"])
    return {"rows": rows, "steps_timed": n, "warmup": warm,
            "adapter_share": {"plain": share("plain", "plain, no transfer"),
                              "engine": share("engine", "engine, no transfer")},
            "best_engine": best, "goal": ">= 1.0x the plain loop",
            "goal_met": rows[best]["ratio_to_plain"] >= 1.0}


# --------------------------------------------------------------------------- 3. packing

def packing_worker(args) -> None:
    """One process of the packing part: build the small pair, warm up, wait for the common start
    time, take steps for ``--seconds``, write steps and peak memory to ``--result``."""
    import torch

    device = torch.device(args.device)
    data = small_pair(args.dry_run, steps=10**6, device=device.type, name=f"pack{os.getpid()}")
    eng = engine_for(data, Path(args.result).with_suffix(""))
    for k in range(2 if args.dry_run else 5):
        eng.step(k)
    sync(device)
    ready = Path(args.result).with_suffix(".ready")
    ready.write_text("ready")
    while time.time() < args.start_at:
        time.sleep(0.01)
    k, t0 = 100, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        eng.step(k)
        k += 1
        if k % 4 == 0:
            sync(device)
    sync(device)
    sec = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps({"steps": k - 100, "seconds": sec,
                                             "peak_mib": peak_memory_mib(device)}))


def part_packing(args, device, tmp: Path, skipped: list[str]) -> dict:
    levels = [1, 2] if args.dry_run else [1, 2, 4, 8]
    seconds = 0.5 if args.dry_run else args.pack_seconds
    if args.dry_run:
        skip(skipped, "packing 4 and 8 processes: GPU run only (a dry run packs 1 and 2 on the CPU)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SITE) if SITE.is_dir() else "", str(ROOT),
                                                                    os.environ.get("PYTHONPATH", "")) if p)}
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    rows = []
    for n in levels:
        results = [tmp / f"pack-{n}-{i}.json" for i in range(n)]
        start_at = time.time() + 3600  # replaced once every process is ready
        ctl = tmp / f"pack-{n}.start"
        procs = [subprocess.Popen([sys.executable, __file__, "--packing-worker", "--result", str(r),
                                   "--device", str(device), "--seconds", str(seconds), "--start-file", str(ctl)]
                                  + (["--dry-run"] if args.dry_run else []), env=env, cwd=str(ROOT))
                 for r in results]
        deadline = time.time() + 300
        while not all(r.with_suffix(".ready").exists() for r in results):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"packing {n}: a worker failed or never became ready")
            time.sleep(0.05)
        start_at = time.time() + 0.5
        part = ctl.with_suffix(".part")  # written whole, then renamed: a worker never reads it half-written
        part.write_text(str(start_at))
        part.replace(ctl)
        for p in procs:
            if p.wait(timeout=seconds + 600) != 0:
                raise RuntimeError(f"packing {n}: a worker exited with {p.returncode}")
        got = [json.loads(r.read_text()) for r in results]
        steps_per_s = sum(g["steps"] / g["seconds"] for g in got)
        row = {"processes": n, "pair_steps_per_s": round(steps_per_s, 3),
               "pairs_per_hour": round(steps_per_s * 3600 / PAIR_STEPS, 2),
               "peak_mib_per_process": round(max(g["peak_mib"] for g in got), 1)}
        rows.append(row)
        print(f"  packing {n}: {row['pair_steps_per_s']} pair steps/s in all, {row['pairs_per_hour']} pairs/h, "
              f"peak {row['peak_mib_per_process']} MiB per process", flush=True)
    knee = rows[-1]["processes"]
    for prev, cur in zip(rows, rows[1:]):
        if cur["pair_steps_per_s"] < 1.05 * prev["pair_steps_per_s"]:
            knee = prev["processes"]
            break
    return {"rows": rows, "seconds_per_level": seconds, "pair_steps_per_pair": PAIR_STEPS,
            "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)",
            "stops_rising_after": knee}


# --------------------------------------------------------------------------- report

def skip(skipped: list[str], line: str) -> None:
    print(f"  skipped: {line}", flush=True)
    skipped.append(line)


def machine(device) -> dict:
    import torch

    d = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
         "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        d.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return d


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["## GPU suite (`benchmarks/gpu_suite.py`)", "",
             f"- date: {res['date']}; git: {res['git']}; command: `{res['command']}`",
             f"- machine: " + (f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if "gpu" in m else "no GPU")
             + f", {m['cpus']} CPUs; "
             f"python {m['python']}, torch {m['torch']}, CUDA {m.get('cuda', '-')}",
             f"- whole suite: {res['seconds']:.0f} s" + ("; **dry run** (CPU, tiny shapes)" if res["dry_run"] else ""),
             ""]
    c = res.get("cuda_path")
    if c:
        lines += ["### CUDA path", "", "| run | finite | target test acc | s |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['finite']} | {v['target_test_acc']} | {v['seconds']} |" for k, v in c["runs"].items()]
        r = c["fp32_repeat"]
        lines += ["", f"fp32 run twice: max |Δ| {r['max_abs_diff']:.3g} ({r['metric'] or '-'}) against the stated "
                      f"tolerance {r['tolerance']:g}: {'within' if r['within'] else 'OUTSIDE'}; settings "
                      + ", ".join(f"{k}={v}" for k, v in c["settings"].items()), ""]
    t = res.get("throughput")
    if t:
        lines += ["### Throughput against the plain loop", "",
                  "ResNet-50 → MobileNetV2, CIFAR-100 shape (synthetic), batch 128, `fc.weight` (100×2048) → "
                  "`features.16.project` (160×960) full matrices, authors' adapter (L = 2, h = 8, delta rule), "
                  f"t_cycle 1; {t['steps_timed']} timed steps after {t['warmup']}.", "",
                  "| loop | ms / pair step | pair steps / s | × plain |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['ms_per_step']} | {v['pair_steps_per_s']} | {v['ratio_to_plain']} |"
                  for k, v in t["rows"].items()]
        a = t["adapter_share"]
        lines += ["", f"Adapter's share of the step (1 − no-transfer / transfer): plain {a['plain']:.1%}, "
                      f"engine {a['engine']:.1%}. Goal (engine {t['goal']}): best engine variant "
                      f"'{t['best_engine']}' → {'met' if t['goal_met'] else 'NOT met'}.", ""]
    p = res.get("packing")
    if p:
        lines += ["### Packing", "", f"The small pair (ResNet-18 w16 → MobileNetV2 ×0.35, batch 64) in N concurrent "
                                     f"engine processes, {p['seconds_per_level']} s each; a pair = "
                                     f"{p['pair_steps_per_pair']} pair steps; memory: {p['memory']}.", "",
                  "| processes | pair steps / s (all) | pairs / hour | peak MiB / process |", "|---|---|---|---|"]
        lines += [f"| {r['processes']} | {r['pair_steps_per_s']} | {r['pairs_per_hour']} | "
                  f"{r['peak_mib_per_process']} |" for r in p["rows"]]
        lines += ["", f"Throughput stops rising after {p['stops_rising_after']} process(es).", ""]
    if res["skipped"]:
        lines += ["Skipped: " + "; ".join(res["skipped"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="device cpu, tiny shapes, a few steps (CI)")
    ap.add_argument("--json", default=None, help="the result (default: benchmarks/results/gpu_suite.json)")
    ap.add_argument("--out", default=None, help="write the section into this markdown file (docs/BENCHMARKS.md)")
    ap.add_argument("--parts", default="cuda_path,throughput,packing")
    ap.add_argument("--steps", type=int, default=30, help="timed pair steps per throughput row")
    ap.add_argument("--pack-seconds", type=float, default=12.0, help="timed seconds per packing level")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="write the section of a stored result (a GPU run's JSON) into --out, and stop")
    ap.add_argument("--packing-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--device", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--start-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.render:  # no torch needed: the section of a result fetched from the GPU machine
        res = json.loads(Path(args.render).read_text())
        write_section(Path(args.out or ROOT / "docs" / "BENCHMARKS.md"), SECTION, markdown(res), "# Benchmarks\n")
        return 0
    check_requirements()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.packing_worker:  # one process of the packing part (started by part_packing)
        Path(args.result).with_suffix(".ready").unlink(missing_ok=True)
        packing_worker(_Waiting(args, Path(args.start_file)))
        return 0
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run with --dry-run on a CPU", file=sys.stderr)
        return 3
    t0 = time.time()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_rev(),
           "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dry_run": args.dry_run, "machine": machine(device), "skipped": []}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    import tempfile

    parts = {"cuda_path": part_cuda_path, "throughput": part_throughput, "packing": part_packing}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as d:
        for name in args.parts.split(","):
            print(f"gpu_suite: {name}", flush=True)
            res[name] = parts[name](args, device, Path(d), res["skipped"])
    res["seconds"] = time.time() - t0
    res["imported_banned"] = sorted(m for m in BANNED if m in sys.modules)
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / "gpu_suite.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"gpu_suite: result {out}", flush=True)
    if args.out:
        write_section(Path(args.out), SECTION, markdown(res), "# Benchmarks\n")
        print(f"gpu_suite: section written to {args.out}", flush=True)
    return 1 if res["imported_banned"] else 0


class _Waiting:
    """The worker's arguments, whose ``start_at`` is read from the start file when first asked."""

    def __init__(self, args, start: Path):
        self._args, self._start = args, start

    def __getattr__(self, name):
        if name == "start_at":
            while not self._start.exists():
                time.sleep(0.01)
            return float(self._start.read_text())
        return getattr(self._args, name)


if __name__ == "__main__":
    sys.exit(main())
