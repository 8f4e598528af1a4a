"""Async exchange with bounded staleness: what it does to quality and speed (3 seeds).

    python benchmarks/async_quality.py [--quick] [--out docs/RESULTS.md]

The small benchmark pair (ResNet-18 width 16 -> MobileNetV2 x0.35 on Fashion-MNIST, the
offline CIFAR stand-in) trained on a local Ray by :func:`orchestrator.topology.split.driver.run_pair_on_ray`
(1 source + 1 target worker, 1 CPU each) with ``ray.mode`` sync, async staleness 1 and
async staleness 2, seeds 0, 1, 2 (seed by seed, the mode order rotated per seed so that
drift in the machine's load hits every mode alike). Writes mean ± std of the target's test
accuracy at the final epoch and at the best-validation epoch, and the time per run, between
``<!-- async_quality:start -->`` and ``<!-- async_quality:end -->`` of ``--out`` (other
sections are left alone). ``--render-json`` rewrites the section from a ``--json`` dump.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402  (sets thread/env defaults before torch/ray load)

HEADER = """# Results

Measured results; each section is written by the script named in it.
"""

MODES = [("sync", 0), ("async", 1), ("async", 2)]


def _fmt(xs: list[float], pct: bool = True, digits: int = 2) -> str:
    k = 100 if pct else 1
    if len(xs) == 1:
        return f"{k * xs[0]:.{digits}f}"
    return f"{k * statistics.mean(xs):.{digits}f} ± {k * statistics.stdev(xs):.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 short epochs (a smoke run)")
    p.add_argument("--out", default=str(bu.ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per epoch (cap)")
    p.add_argument("--t-cycle", type=int, default=1)
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--test-subset", type=int, default=1000)
    bu.add_run_args(p, json_help="also dump every run's summary here")
    args = p.parse_args(argv)
    if args.render_json:
        bu.show(json.loads(Path(args.render_json).read_text()), render, args.out, "async_quality", HEADER)
        return 0
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.steps = args.steps or (8 if args.quick else 25)

    def log(msg):
        print(f"[async_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start = time.perf_counter()
    waited = bu.wait_for_load(args.wait_load, args.max_wait, log=log)
    wait_s = time.perf_counter() - t_start
    load0 = bu.loadavg()
    log(f"load average at start {load0}")
    bu.start_ray(args.num_cpus)
    machine = bu.machine_record()

    import ray

    from orchestrator.config import parse_config
    from orchestrator.topology.split.driver import run_pair_on_ray

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="async_quality-") as work:
        for i, seed in enumerate(args.seeds):
            for mode, stale in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:  # rotate: load drift hits all modes
                ray_opts = {"mode": mode, **({"staleness": stale} if stale else {})}
                cfg = parse_config(bu.pair_config(
                    t_cycle=args.t_cycle, epochs=args.epochs, steps_per_epoch=args.steps, seed=seed,
                    train_subset=args.train_subset, test_subset=args.test_subset, ray=ray_opts,
                    name=f"async-quality-{mode}{stale}"))
                out = Path(work) / f"{mode}{stale}-s{seed}"
                t0 = time.perf_counter()
                final = run_pair_on_ray(cfg, out)
                total = time.perf_counter() - t0
                hist = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
                train_s = sum(r["time/train_s"] for r in hist)
                steps = hist[-1]["step"]
                runs.append({"mode": mode, "staleness": stale, "seed": seed, "final": final, "total_s": total,
                             "train_s": train_s, "ms_per_step": 1e3 * train_s / steps,
                             "transfers": sum(r.get("adapter/transfers", 0) for r in hist), "steps": steps,
                             **_receiver(hist)})
                log(f"{mode} s{stale} seed {seed}: final test {final['target/final_test_acc']:.4f}, "
                    f"at best val {final['target/test_acc_at_best_val']:.4f} (epoch "
                    f"{final['target/best_val_epoch']}), {runs[-1]['ms_per_step']:.0f} ms/step, "
                    f"run {total:.0f} s")
    load1 = bu.loadavg()
    wall = time.perf_counter() - t_start
    record = {"args": vars(args), "machine": machine, "load": [load0, load1], "waited": waited, "wait_s": wait_s, "wall_s": wall, "order": "rotated",
              "runs": runs}
    bu.publish(record, render, args, "async_quality", HEADER, log)
    ray.shutdown()
    return 0


def _receiver(hist: list[dict]) -> dict:
    """The target's transfer steps, writes, mean age of what it wrote (steps) and mean wait in get (ms)."""
    n = sum(r.get("target/transfer_steps", 0) for r in hist)
    w = sum(r.get("target/transfer_writes", 0) for r in hist)
    age = sum(r.get("target/transfer_age_steps", 0) * r.get("target/transfer_writes", 0) for r in hist)
    wait = sum(r.get("target/transfer_wait_ms", 0) * r.get("target/transfer_steps", 0) for r in hist)
    return {"transfer_steps": n, "writes": w, "age_steps": age / max(1, w), "wait_ms": wait / max(1, n)}


def _same(a: dict, b: dict) -> bool:
    keys = ("target/final_test_acc", "target/final_val_acc", "target/best_val_acc", "source/final_test_acc")
    return all(a["final"].get(k) == b["final"].get(k) for k in keys)


def render(record: dict) -> str:
    args = argparse.Namespace(**record["args"])
    machine, (load0, load1), waited, wall, runs = (record["machine"], record["load"], record["waited"],
                                                   record["wall_s"], record["runs"])

    L = [f"## Async exchange with bounded staleness (`benchmarks/async_quality.py`"
         f"{' --quick' if args.quick else ''})", ""]
    L += bu.machine_lines(machine, load0, load1, waited, args.wait_load)
    L.append(f"- whole script: {wall / 60:.1f} min, of which {record.get('wait_s', 0) / 60:.1f} min waiting for the "
             f"load and {(wall - record.get('wait_s', 0)) / 60:.1f} min measuring; local Ray with num_cpus={args.num_cpus}")
    L += ["",
          "Data set: **Fashion-MNIST** (the offline stand-in for CIFAR: 32×32, grey repeated to 3 channels; "
          f"{args.train_subset} training images drawn per seed, 10 % of them carved off for validation, "
          f"{args.test_subset} test images) — not CIFAR. "
          "Pair: ResNet-18 (width 16) → MobileNetV2 (×0.35), batch 64, SGD 0.05 / momentum 0.9 / cosine, "
          f"{args.epochs} epochs × {args.steps} steps, MergeNet learned rank-4 layer pair "
          f"`{bu.PAIR_LAYER['source']}` → `{bu.PAIR_LAYER['target']}`, adapter L = 2, h = 8, "
          f"`t_cycle` {args.t_cycle}, `update_rule: delta`. On Ray: `run_pair_on_ray`, 1 source + 1 target "
          "worker with 1 CPU each, adapter actor with 0 CPUs. *sync* waits for the adapter output of the "
          "current transfer step and for the adapter update (it reproduces the single-process engine to "
          "1e-5, `tests/test_ray_pair.py`); *async, staleness k*: the adapter actor generates and updates "
          "on a background thread, and at each transfer step the target writes the newest output at most "
          "k transfers old -- in steady state the one generated from the previous transfer's factors while "
          "it trained -- or nothing if that one is not ready yet and its last write is recent enough; it "
          "never waits for the update (docs/METHOD.md, \"Async exchange\"). Async results depend on timing "
          "(not bit-reproducible). *writes / transfer steps*, *age* (mean steps between the factors an "
          "output was generated from and its write) and *wait* (mean ms the target spent in `get` per "
          "transfer step) are the target's own per-epoch metrics, summed over the run. "
          f"Seeds {', '.join(map(str, args.seeds))}; mean ± std over seeds (sample std). "
          "*best-val* = target test accuracy at the epoch of the best target validation accuracy "
          "(never best-on-test). *ms / step* = target leader's `time/train_s` / steps (training only); "
          "*run s* = the whole `run_pair_on_ray` call (Ray Train start-up, evaluation, checkpoints).", ""]
    rows = []
    base = None
    for mode, stale in MODES:
        rs = [r for r in runs if r["mode"] == mode and r["staleness"] == stale]
        if not rs:
            continue
        fin = [r["final"]["target/final_test_acc"] for r in rs]
        best = [r["final"]["target/test_acc_at_best_val"] for r in rs]
        src = [r["final"]["source/final_test_acc"] for r in rs if "source/final_test_acc" in r["final"]]
        msps = [r["ms_per_step"] for r in rs]
        if base is None:
            base = statistics.mean(msps)
        rows.append([mode if mode == "sync" else f"async, staleness {stale}", len(rs), _fmt(fin), _fmt(best),
                     _fmt(src) if src else "–", _fmt(msps, pct=False, digits=0),
                     f"{statistics.mean(msps) / base:.2f}", _fmt([r["total_s"] for r in rs], pct=False, digits=0),
                     (f"{statistics.mean(r['writes'] for r in rs):.0f} / {rs[0]['transfer_steps']}"
                      if "writes" in rs[0] else "–"),
                     f"{statistics.mean(r['age_steps'] for r in rs):.2f}" if "writes" in rs[0] else "–",
                     f"{statistics.mean(r['wait_ms'] for r in rs):.0f}" if "writes" in rs[0] else "–"])
    L += bu.table(["exchange", "seeds", "target final test acc %", "target test acc % at best val",
                   "source final test acc %", "ms / step", "step time vs sync", "run s",
                   "writes / transfer steps", "age (steps)", "wait (ms)"], rows)
    if record.get("order") == "rotated":
        order = "the mode order rotated from seed to seed, so that drift in the machine's load hits every mode alike"
    else:
        order = ("the same mode order (sync, async s1, async s2) for every seed, so runs later in each seed's "
                 "block ran at a different load than earlier ones")
    L += ["", f"Runs ran one at a time in the order of the per-run table ({order}); the 1-min load went from "
              f"{load0[0]:.1f} at the start to {load1[0]:.1f} at the end. The ms / step and run s columns compare "
              "runs made at different moments on a shared machine, so they are not a clean speed comparison: "
              "see `docs/BENCHMARKS.md` (`bench_pair`) for the same-run step-time and overhead figures."]
    L += ["", "Per run:", ""]
    L += bu.table(["exchange", "seed", "final test %", "best-val epoch", "test % at best val", "ms / step", "run s"],
                  [[r["mode"] if r["mode"] == "sync" else f"async s{r['staleness']}", r["seed"],
                    f"{100 * r['final']['target/final_test_acc']:.2f}", r["final"]["target/best_val_epoch"],
                    f"{100 * r['final']['target/test_acc_at_best_val']:.2f}", f"{r['ms_per_step']:.0f}",
                    f"{r['total_s']:.0f}"] for r in runs])
    notes = []
    for mode, stale in MODES[1:]:
        pairs = [(r, next((q for q in runs if q["mode"] == "sync" and q["seed"] == r["seed"]), None))
                 for r in runs if r["mode"] == mode and r["staleness"] == stale]
        pairs = [(r, q) for r, q in pairs if q is not None]
        if pairs:
            same = sum(_same(r, q) for r, q in pairs)
            notes.append(f"async staleness {stale}: {same} of {len(pairs)} seeds gave exactly the sync run's "
                         "accuracies (final and best-val, target and source)")
    if notes:
        L += ["", "Same-seed comparison with sync: " + "; ".join(notes) + "."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
