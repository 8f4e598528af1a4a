"""Exchange latency, Ray pair step time vs the engine, and transfer overhead, in one run.

    python benchmarks/bench_pair.py [--quick] [--out docs/BENCHMARKS.md]

Everything is measured in this one process run on this machine, and written as one Markdown
section between ``<!-- bench_pair:start -->`` and ``<!-- bench_pair:end -->`` of ``--out``:

1. **Exchange round trip.** A real local Ray and an :class:`orchestrator.topology.split.actor.AdapterActor`
   for several link shapes; from the caller's side, through the workers' own proxy
   (:class:`orchestrator.topology.split.actor.RayExchange`, sync mode): put(A_s) + put(A_t) + get(A'_t) +
   feedback(∂), median and p90 over N repetitions, with the adapter's own compute
   (``generate``/``update``) reported by the hub, and the same protocol against an *echo*
   actor that does no compute (the transport floor).
2. **Pair step time.** The same small pair trained for a fixed number of steps by the
   single-process :class:`mergenet_core.training.engine.Engine` and by
   :func:`orchestrator.topology.split.driver.run_pair_on_ray` (1 source + 1 target worker, 1 CPU each).
   Per-step time = ``time/train_s`` / steps of each epoch (no Ray start-up, no evaluation),
   median over the epochs after the first (warm-up).
3. **Transfer overhead.** ``overhead = (t_with - t_without) / t_with`` where ``t_without``
   is the same pair, same topology, with ``t_cycle`` larger than the run: the only transfer
   is at step 0, inside the warm-up epoch that is not measured.
4. **Adapter width** (issue #12 item 5; section ``bench_pair_width``). The quickstart grid's
   image pair (ResNet-18 width 8 → MobileNetV2 ×0.25, ``fc.weight`` → ``features.16.project``,
   svd rank 4, adapter L = 1, h = 4) at ``t_cycle: 1`` with the authors' adapter width
   (``adapter.width`` unset) and with a small fixed ``adapter.width`` (``--width``, 64):
   the transfer's share of the pair step (engine, the topology a quickstart trial runs:
   transfer and plain steps of both widths interleaved in one process, medians), the
   adapter's parameter count against the target model's, and the target's test accuracy
   after a short training budget (default: the earlier quickstart's) over ``--seeds`` seeds (with ``alone`` for reference; paired
   by seed). ``--widths-only`` runs just this part (no Ray).

    python benchmarks/bench_pair.py --widths-only [--quick]

Timings are never assertions anywhere; this script only measures and writes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402  (sets thread/env defaults before torch/ray load)

import ray  # noqa: E402
import torch  # noqa: E402

HEADER = """# Benchmarks

Measured numbers, each section written by the script named in it (one run, one machine).
Timings are never turned into test assertions. Re-run a script to refresh its section.
"""

OFF = 10**9  # t_cycle larger than any run: only step 0 transfers (inside the unmeasured warm-up epoch)


# --------------------------------------------------------------------------- exchange round trip


@ray.remote
class EchoActor:
    """The adapter actor's call protocol with no adapter: the transport floor."""

    def __init__(self):
        self.cv = threading.Condition()
        self.box: dict = {}

    def put(self, step: int, keys: list, *mats) -> None:
        with self.cv:
            self.box.setdefault(step, {}).update(zip(map(tuple, keys), mats))
            self.cv.notify_all()

    def get(self, step: int, role: str):
        with self.cv:
            self.cv.wait_for(lambda: len(self.box.get(step, {})) >= 2, 60)
            x = self.box.pop(step)[("0", "x")]
            return step, {"0": x.clone()}

    def feedback(self, gen_step: int, keys: list, epoch: int, *grads) -> None:
        return None

    def threads(self) -> int:
        return torch.get_num_threads()


class _Proxy:
    """Minimal exchange proxies for the echo actor: factors as direct call arguments (inline
    when ≤ 100 KiB) or each ``ray.put`` first and passed by reference."""

    def __init__(self, actor, via_put: bool):
        self.actor, self.via_put = actor, via_put

    def put(self, step, mats):
        keys = list(mats)
        vals = [mats[k].detach().cpu().clone() for k in keys]
        self.actor.put.remote(step, keys, *([ray.put(v) for v in vals] if self.via_put else vals))

    def get(self, step, role):
        return ray.get(self.actor.get.remote(step, role))

    def feedback(self, gen_step, grads, epoch):
        keys = list(grads)
        ray.get(self.actor.feedback.remote(gen_step, keys, epoch, *[grads[k].detach().cpu() for k in keys]))


def _round_trips(proxy, shape_t, shape_s, reps: int, warmup: int, start_step: int = 0):
    g = torch.Generator().manual_seed(0)
    a_s, a_t = torch.randn(shape_s, generator=g), torch.randn(shape_t, generator=g)
    grad = 1e-3 * torch.randn(shape_t, generator=g)
    total, get_lat, fb_lat = [], [], []
    for i in range(warmup + reps):
        k = start_step + i
        t0 = time.perf_counter()
        proxy.put(k, {("0", "y"): a_s})          # source leader
        proxy.put(k, {("0", "x"): a_t})          # target leader
        gen, out = proxy.get(k, "target")        # target leader waits for A'_t
        t1 = time.perf_counter()
        proxy.feedback(gen, {"0": grad}, 0)      # target leader, after its step (sync: waits for the update)
        t2 = time.perf_counter()
        assert tuple(out["0"].shape) == tuple(shape_t)
        if i >= warmup:
            total.append(t2 - t0)
            get_lat.append(t1 - t0)
            fb_lat.append(t2 - t1)
    return total, get_lat, fb_lat


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_exchange(sizes, reps_for, log) -> list[dict]:
    from orchestrator.config import parse_config
    from orchestrator.topology.split.actor import AdapterActor, RayExchange

    rows = []
    for label, shape_t, shape_s in sizes:
        reps, warmup = reps_for(shape_t, shape_s)
        # AdapterActor takes the link shapes explicitly; the config only supplies the adapter options
        cfg = parse_config(bu.pair_config(t_cycle=1, epochs=1, steps_per_epoch=10**6))
        log(f"exchange: {label} {shape_t} <- {shape_s}: {warmup} + {reps} round trips")
        actor = AdapterActor.options(max_concurrency=16, num_cpus=0).remote(
            cfg, {"0": (tuple(shape_t), tuple(shape_s))}, 10**6)
        try:
            ray.get(actor.begin.remote("bench"))  # an attempt: what rank 0 of a pair starts first
            proxy = RayExchange(actor, leader=True, sync=True, attempt="bench")
            _round_trips(proxy, shape_t, shape_s, 0, warmup)
            proxy.take_epoch_metrics()
            total, get_lat, fb_lat = _round_trips(proxy, shape_t, shape_s, reps, 0, start_step=warmup)
            hub = proxy.take_epoch_metrics()
        finally:
            ray.kill(actor)
        echo = EchoActor.options(max_concurrency=16, num_cpus=0).remote()
        try:
            ereps = max(reps, 20)
            echo_direct, echo_ref = [], []
            for rep in range(2):  # interleave the two variants
                echo_direct += _round_trips(_Proxy(echo, False), shape_t, shape_s,
                                            ereps // 2, 2, 1000 * (2 * rep + 1))[0]
                echo_ref += _round_trips(_Proxy(echo, True), shape_t, shape_s, ereps // 2, 2, 1000 * (2 * rep + 2))[0]
        finally:
            ray.kill(echo)
        n_t, n_s = shape_t[0] * shape_t[1], shape_s[0] * shape_s[1]
        params = _adapter_params(cfg, shape_t, shape_s)
        rows.append({
            "label": label, "shape_t": list(shape_t), "shape_s": list(shape_s), "reps": reps, "params": params,
            "bytes": 4 * (n_s + 3 * n_t), "bytes_out": 4 * (n_s + n_t), "bytes_in": 4 * n_t,
            "rt_med": statistics.median(total), "rt_p90": _q(total, 0.9),
            "get_med": statistics.median(get_lat), "fb_med": statistics.median(fb_lat),
            "gen_ms": hub["adapter/generate_ms"], "upd_ms": hub["adapter/update_ms"],
            "echo_med": statistics.median(echo_direct), "echo_p90": _q(echo_direct, 0.9),
            "echo_ref_med": statistics.median(echo_ref), "echo_ref_p90": _q(echo_ref, 0.9),
        })
        log(f"  round trip median {1e3 * rows[-1]['rt_med']:.1f} ms (adapter {rows[-1]['gen_ms']:.1f} + "
            f"{rows[-1]['upd_ms']:.1f} ms), echo {1e3 * rows[-1]['echo_med']:.1f} ms")
    return rows


def _adapter_params(cfg, shape_t, shape_s) -> int:
    from mergenet_core.methods.mergenet.adapter import ParameterAdapter, adapter_param_count

    a = cfg.method.options.get("adapter") or {}
    with torch.device("meta"):  # count without allocating (the 512x512x3x3 link has ~10^8 parameters)
        return adapter_param_count(ParameterAdapter(tuple(shape_t), tuple(shape_s), a.get("layers", 2),
                                                    a.get("heads", 8)))


# --------------------------------------------------------------------------- pair step time


def _per_step(history: list[dict], spe: int) -> list[float]:
    """Per-step seconds of each epoch after the first (warm-up), from ``time/train_s``."""
    return [r["time/train_s"] / spe for r in history[1:]]


def _adapter_ms(history: list[dict]) -> tuple[float, float]:
    hs = [r for r in history[1:] if r.get("adapter/transfers", 0) > 0]
    if not hs:
        return float("nan"), float("nan")
    return (statistics.median(r["adapter/generate_ms"] for r in hs), statistics.median(r["adapter/update_ms"] for r in hs))


def _receiver_stats(history: list[dict]) -> tuple[float, float, float]:
    """Target's mean wait in ``get`` (ms), mean age of the written output (steps) and the share
    of transfer steps that wrote an output, over the epochs after the first."""
    hs = [r for r in history[1:] if r.get("target/transfer_steps", 0) > 0]
    if not hs:
        return float("nan"), float("nan"), float("nan")
    return (statistics.median(r["target/transfer_wait_ms"] for r in hs),
            statistics.median(r["target/transfer_age_steps"] for r in hs),
            sum(r["target/transfer_writes"] for r in hs) / sum(r["target/transfer_steps"] for r in hs))


def run_engine(cfg_dict: dict, out: Path) -> list[dict]:
    from orchestrator.config import parse_config
    from mergenet_core.training.engine import Engine

    torch.set_num_threads(1)  # as each Ray worker (1 CPU -> OMP_NUM_THREADS=1)
    Engine(parse_config(cfg_dict), out, progress=False).run()
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]


def run_ray(cfg_dict: dict, out: Path) -> list[dict]:
    from orchestrator.config import parse_config
    from orchestrator.topology.split.driver import run_pair_on_ray

    run_pair_on_ray(parse_config(cfg_dict), out)
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]


def bench_breakdown(steps: int, log) -> dict:
    """Phase times of single engine steps, transfer and plain steps interleaved (t_cycle 2), in
    one process: the machine's load drifts alike over both kinds of step."""
    from orchestrator.config import parse_config
    from mergenet_core.training.engine import PairState
    from mergenet_core.training.step import train_roles

    torch.set_num_threads(1)
    cfg = parse_config(bu.pair_config(t_cycle=2, epochs=1, steps_per_epoch=10**6, eval_every=10**6,
                                      train_subset=max(600, steps * 64 + 200), test_subset=200))
    pair = PairState.build(cfg)
    m, roles = pair.method, pair.roles
    fb = {"t": 0.0}
    feedback = m.exchange.feedback

    def timed_feedback(*a, **k):
        t0 = time.perf_counter()
        feedback(*a, **k)
        fb["t"] += time.perf_counter() - t0

    m.exchange.feedback = timed_feedback
    rec = {"exchange": [], "src_plain": [], "src_xfer": [], "tgt_plain": [], "tgt_xfer": [], "feedback": [],
           "step_plain": [], "step_xfer": []}
    warm = 4
    for k in range(warm + steps):
        fb["t"] = 0.0
        t0 = time.perf_counter()
        xfer = m.is_transfer(k)
        m.before_step(k, roles)  # a transfer step: every role's put, then get
        t1 = time.perf_counter()
        train_roles(pair, k, ("source",))
        t2 = time.perf_counter()
        train_roles(pair, k, ("target",))
        t3 = time.perf_counter()
        if k < warm:
            continue
        kind = "xfer" if xfer else "plain"
        if xfer:
            rec["exchange"].append(t1 - t0)
            rec["feedback"].append(fb["t"])
        rec[f"src_{kind}"].append(t2 - t1)
        rec[f"tgt_{kind}"].append(t3 - t2 - fb["t"])
        rec[f"step_{kind}"].append(t3 - t0)
    out = {k: statistics.median(v) for k, v in rec.items() if v}
    out["n"] = steps
    log("breakdown: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in out.items() if k != "n"))
    return out


def bench_steps(args, work: Path, log) -> dict:
    """Every (runner, mode, staleness, t_cycle) config, ``--repeats`` times, interleaved."""
    configs = [("engine", "sync", 0, 1), ("engine", "sync", 0, 5), ("engine", "sync", 0, OFF),
               ("ray", "sync", 0, 1), ("ray", "sync", 0, 5), ("ray", "sync", 0, OFF),
               ("ray", "async", 1, 1), ("ray", "async", 1, 5),
               ("ray", "async", 2, 1), ("ray", "async", 2, 5)]
    if args.quick:
        configs = [c for c in configs if not (c[1] == "async" and c[2] == 2)]
    results: dict[tuple, dict] = {c: {"steps": [], "gen": [], "upd": [], "runs": 0} for c in configs}
    for rep in range(args.repeats):
        shift = (rep * len(configs)) // max(1, args.repeats)  # rotate: a config's repeats lie far apart
        order = configs[shift:] + configs[:shift]
        for c in order:
            runner, mode, stale, tc = c
            ray_opts = {"mode": mode, **({"staleness": stale} if stale else {})}
            cfg = bu.pair_config(t_cycle=tc, epochs=args.epochs, steps_per_epoch=args.steps, eval_every=10**6,
                                 train_subset=max(600, (args.steps * 64 * 10) // 9 + 64), test_subset=200,
                                 ray=ray_opts)
            out = work / f"{runner}-{mode}{stale}-t{tc}-r{rep}"
            t0 = time.perf_counter()
            hist = (run_engine if runner == "engine" else run_ray)(cfg, out)
            per = _per_step(hist, args.steps)
            g, u = _adapter_ms(hist)
            res = results[c]
            res["steps"] += per
            res["gen"].append(g)
            res["upd"].append(u)
            w, age, writes = _receiver_stats(hist)
            res.setdefault("wait", []).append(w)
            res.setdefault("age", []).append(age)
            res.setdefault("writes", []).append(writes)
            res["runs"] += 1
            res.setdefault("rep_medians", []).append(statistics.median(per))
            log(f"{runner:6s} {mode:5s} s{stale} t_cycle {_tc(tc):>5s} rep {rep}: "
                f"{1e3 * statistics.median(per):7.1f} ms/step  (run {time.perf_counter() - t0:.0f} s)")
    return results


def _tc(tc: int) -> str:
    return "off" if tc == OFF else str(tc)


# --------------------------------------------------------------------------- adapter width (issue #12 item 5)

#: the earlier quickstart grid's image pair (img-r18-mbv2, before the quickstart redesign), copied here so
#: that edits of the quickstart file do not change this benchmark; t_cycle 1 instead of 2
QUICKSTART_IMAGE_TASK = {"name": "fashion_mnist", "options": {"image_size": 32, "channels": 3, "train_subset": 2000,
                                                              "test_subset": 1000}}


def width_config(width: int | None, *, seed: int, epochs: int, steps: int, method: str = "mergenet",
                 task: dict | None = None, eval_every: int = 1) -> dict:
    """The quickstart image pair on CPU; ``width`` None = the authors' adapter widths."""
    task = task or QUICKSTART_IMAGE_TASK
    adapter = {"layers": 1, "heads": 4, **({"width": width} if width else {})}
    cfg = {
        "name": f"width-{width or 'authors'}-s{seed}", "seed": seed, "device": "cpu",
        "source": {"model": {"name": "resnet18", "options": {"width": 8, "blocks": [1, 1, 1, 1]}}, "task": task},
        "target": {"model": {"name": "mobilenetv2", "options": {"width_mult": 0.25}}, "task": task},
        "recipe": {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
                   "schedule": {"name": "cosine"}, "epochs": epochs, "steps_per_epoch": steps, "batch_size": 32,
                   "eval_batch_size": 256, "eval_every": eval_every},
        "method": {"name": method, "options": {} if method == "alone" else {
            "t_cycle": 1, "adapter": adapter, "update_rule": "delta",
            "layer_pairs": [{"source": "fc.weight", "target": "features.16.project.conv.weight", "mode": "svd",
                             "rank": 4}]}},
    }
    if method == "alone":
        cfg.pop("source")
    return cfg


def bench_width_overhead(widths: list, steps: int, log) -> dict:
    """Per width: median plain step, transfer step and adapter phases (ms). Both pairs step in
    turn in one process (t_cycle 2 here, so transfer and plain steps alternate): the load
    drifts alike over every kind of step and width."""
    from orchestrator.config import parse_config
    from mergenet_core.training.engine import PairState
    from mergenet_core.training.step import train_roles

    torch.set_num_threads(1)
    pairs, timers = {}, {}
    for w in widths:
        cfg = width_config(w, seed=0, epochs=1, steps=10**6, eval_every=10**6)
        cfg["method"]["options"]["t_cycle"] = 2
        pairs[w] = PairState.build(parse_config(cfg))
        ex = pairs[w].method.exchange
        fb = {"t": 0.0}
        feedback = ex.feedback

        def timed_feedback(*a, _f=feedback, _fb=fb, **k):
            t0 = time.perf_counter()
            _f(*a, **k)
            _fb["t"] += time.perf_counter() - t0

        ex.feedback = timed_feedback
        timers[w] = fb
    rec = {w: {"step_plain": [], "step_xfer": [], "exchange": [], "feedback": []} for w in widths}
    warm = 4
    for k in range(warm + 2 * steps):
        for w in (widths if k % 4 < 2 else widths[::-1]):  # alternate which width goes first
            m, roles, fb = pairs[w].method, pairs[w].roles, timers[w]
            fb["t"] = 0.0
            t0 = time.perf_counter()
            xfer = m.is_transfer(k)
            m.before_step(k, roles)
            t1 = time.perf_counter()
            train_roles(pairs[w], k)
            t2 = time.perf_counter()
            if k < warm:
                continue
            rec[w]["step_xfer" if xfer else "step_plain"].append(t2 - t0)
            if xfer:
                rec[w]["exchange"].append(t1 - t0)
                rec[w]["feedback"].append(fb["t"])
    out = {}
    for w in widths:
        med = {k: statistics.median(v) for k, v in rec[w].items()}
        # the transfer's own work per step, timed directly (less noisy than a difference of two medians)
        add = statistics.median(e + f for e, f in zip(rec[w]["exchange"], rec[w]["feedback"]))
        med["transfer"] = add
        med["overhead"] = add / (med["step_plain"] + add)
        med["overhead_diff"] = (med["step_xfer"] - med["step_plain"]) / med["step_xfer"]
        med["n"] = steps
        tgt = pairs[w].roles["target"].model
        med["adapter_params"] = sum(pairs[w].method.exchange.hub.param_counts().values())
        med["target_params"] = sum(p.numel() for p in tgt.parameters())
        med["link"] = [list(x) for x in pairs[w].method.link_shapes()["0"]]
        out[str(w)] = med
        log(f"width {w or 'authors'}: plain {1e3 * med['step_plain']:.1f} ms, transfer {1e3 * med['step_xfer']:.1f} ms, "
            f"transfer work {1e3 * add:.1f} ms -> overhead {100 * med['overhead']:.1f} % "
            f"(step difference {100 * med['overhead_diff']:.1f} %); adapter {med['adapter_params']:,} params vs target "
            f"{med['target_params']:,}")
    return out


def bench_width_accuracy(widths: list, seeds: list[int], epochs: int, steps: int, task: dict, work: Path,
                         log) -> dict:
    """Target test accuracy at the end of the budget: ``alone`` and each width, per seed."""
    arms = [("alone", None, "alone")] + [(f"mergenet, adapter.width {w}" if w else "mergenet, authors' widths", w,
                                          "mergenet") for w in widths]
    out: dict[str, dict] = {label: {} for label, _, _ in arms}
    for seed in seeds:
        for label, w, method in arms:
            t0 = time.perf_counter()
            cfg = width_config(w, seed=seed, epochs=epochs, steps=steps, method=method, task=task,
                               eval_every=epochs)
            hist = run_engine(cfg, work / f"{method}-{w}-s{seed}")
            acc = hist[-1]["target/test_acc"]
            out[label][str(seed)] = {"test_acc": acc, "wall_s": time.perf_counter() - t0}
            log(f"seed {seed} {label}: target test acc {100 * acc:.1f} % ({time.perf_counter() - t0:.0f} s)")
    return out


def render_widths(rec: dict) -> str:
    args = argparse.Namespace(**rec["args"])
    ov, acc = rec["overhead"], rec["accuracy"]
    widths = [None if w == "None" else int(w) for w in ov]
    name = {w: ("authors' widths (`adapter.width` unset)" if w is None else f"`adapter.width: {w}`") for w in widths}
    L = [f"## Adapter width: transfer overhead, size and accuracy (`benchmarks/bench_pair.py --widths-only"
         f"{' --quick' if args.quick else ''}`)", ""]
    L += bu.machine_lines(rec["machine"], rec["load"][0], rec["load"][1], rec["waited"], args.wait_load)[:-1]
    first = ov[str(widths[0])]
    L += [f"- whole run: {rec['wall_s'] / 60:.1f} min", "",
          "Pair: the earlier quickstart grid's image pair (img-r18-mbv2, before the redesign) — ResNet-18 (width 8, one block per stage) → MobileNetV2 (×0.25) "
          "on Fashion-MNIST (the offline CIFAR stand-in: 32×32, grey repeated to 3 channels), "
          "2,000 training images (10 % of them validation), 1,000 test images, batch 32, SGD; MergeNet svd rank 4, "
          f"`fc.weight` → `features.16.project.conv.weight` (A_t {first['link'][0][0]}×{first['link'][0][1]} ← "
          f"A_s {first['link'][1][0]}×{first['link'][1][1]}), adapter L = 1, h = 4, `t_cycle: 1`, on CPU with 1 "
          "torch thread, in one process (the single-process engine: what a quickstart trial runs, "
          "`ray.topology: auto` → inline on CPU).", "",
          "### Transfer overhead and adapter size", "",
          f"Both pairs built once and stepped in turn ({first['n']} transfer and {first['n']} plain steps each, "
          "after 4 warm-up steps; `t_cycle` 2 for this measurement so that transfer and plain steps alternate "
          "under the same load). Transfer work = put + get (read both factors, adapter generate, write) + "
          "feedback (Δ to the hub, adapter backward, clip, AdamW), timed directly on every transfer step. "
          "Share at `t_cycle: 1` (every step transfers) = transfer work / (plain step + transfer work); the "
          "cross-check (transfer step − plain step) / transfer step is a difference of two medians and noisier "
          "on a busy machine. Medians.", ""]
    rows = []
    for w in widths:
        o = ov[str(w)]
        rows.append([name[w], _ms(o["step_plain"]), _ms(o["step_xfer"]),
                     f"{_ms(o['exchange'])} + {_ms(o['feedback'])}", f"**{100 * o['overhead']:.1f} %**",
                     f"{100 * o['overhead_diff']:.1f} %",
                     f"{o['adapter_params']:,}", f"{o['target_params']:,}",
                     f"{o['adapter_params'] / o['target_params']:.2f}×"])
    L += bu.table(["adapter", "plain pair step ms", "transfer pair step ms",
                   "put + get + feedback ms", "transfer share of the pair step (goal ≤ 10 %)",
                   "cross-check: step difference", "adapter params",
                   "target params", "adapter / target"], rows)
    L += ["", "**Goal check** (issue #12 item 5: the transfer ≤ 10 % of the pair step on CPU at `t_cycle: 1`): "
          + "; ".join(f"{name[w]}: {100 * ov[str(w)]['overhead']:.1f} % — "
                      f"{'met' if ov[str(w)]['overhead'] <= 0.10 else 'NOT met'}" for w in widths)
          + " (this machine, this run)."]
    L += ["", "### Target test accuracy after a short training budget", "",
          f"{rec['args']['acc_epochs']} epochs × {rec['args']['acc_steps']} steps of batch 32, evaluated at the "
          f"end (final-epoch test accuracy, not best-on-test), seeds {', '.join(map(str, rec['seeds']))}; the "
          "same seed gives every arm the same data order and target initialisation.", ""]
    labels = list(acc)
    seeds = [str(s) for s in rec["seeds"]]
    rows = []
    for label in labels:
        xs = [acc[label][s]["test_acc"] for s in seeds]
        sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
        rows.append([label, " / ".join(f"{100 * x:.1f}" for x in xs), f"{100 * statistics.mean(xs):.1f}",
                     "–" if sd != sd else f"{100 * sd:.1f}"])
    L += bu.table(["arm", "test acc % per seed", "mean %", "std (pp)"], rows)
    if len(labels) >= 3:
        a, b = labels[1], labels[2]
        d = [acc[b][s]["test_acc"] - acc[a][s]["test_acc"] for s in seeds]
        sd = statistics.stdev(d) if len(d) > 1 else float("nan")
        L += ["", f"Paired by seed, {b} − {a}: {' / '.join(f'{100 * x:+.1f}' for x in d)} pp, mean "
                  f"{100 * statistics.mean(d):+.1f} pp" + ("" if sd != sd else f" (std {100 * sd:.1f} pp)")
              + f" over {len(d)} seeds — a short budget: read it as whether the small width breaks the transfer, "
                "not as a transfer effect."]
    return "\n".join(L) + "\n"


def run_widths(args, log) -> dict:
    widths = [None, args.width]
    if args.quick:
        task = {"name": "fashion_mnist", "options": {"image_size": 32, "channels": 3, "train_subset": 400,
                                                     "test_subset": 200}}
        ov_steps, acc_epochs, acc_steps = 6, 1, 4
    else:
        task, ov_steps = QUICKSTART_IMAGE_TASK, args.width_steps
        acc_epochs, acc_steps = args.acc_epochs or 2, args.acc_steps or 20  # default: the quickstart budget
    args.acc_epochs, args.acc_steps = acc_epochs, acc_steps
    seeds = list(range(args.seeds))
    overhead = bench_width_overhead(widths, ov_steps, log)
    with tempfile.TemporaryDirectory(prefix="bench_width-") as work:
        accuracy = bench_width_accuracy(widths, seeds, acc_epochs, acc_steps, task, Path(work), log)
    return {"overhead": overhead, "accuracy": accuracy, "seeds": seeds}


# --------------------------------------------------------------------------- report


def _put_style() -> str:
    import inspect

    from orchestrator.topology.split.actor import RayExchange

    return "`ray.put`" if "ray.put(" in inspect.getsource(RayExchange.put) else "direct arguments"


def _nanmedian(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def _kib(b: int) -> str:
    return f"{b / 1024:.1f}"


def render(args, machine, load0, load1, waited, ex_rows, steps, thread_info, wall_s, breakdown=None) -> str:
    L = [f"## Pair benchmark (`benchmarks/bench_pair.py`{' --quick' if args.quick else ''})", ""]
    L += bu.machine_lines(machine, load0, load1, waited, args.wait_load)
    L.append(f"- whole script: {wall_s / 60:.1f} min, of which {getattr(args, 'wait_s', 0) / 60:.1f} min waiting for "
             f"the load; local Ray with num_cpus={args.num_cpus}; torch threads: "
             f"engine process 1, Ray workers {thread_info['worker']} (1 CPU each), adapter actor "
             f"{thread_info['actor']} (0 CPUs)")
    L += ["", "### Exchange round trip (one transfer, caller's side)", "",
          "One transfer as a role leader does it, timed in the driver through the workers' proxy "
          "`RayExchange` (sync): `put(A_s)` + `put(A_t)` + `get → A'_t` + `feedback(∂)` (sync mode waits "
          "for the adapter update). *adapter* = the hub's own `generate` + `update` time for that transfer "
          "(dropout on, AdamW step); *echo* = the same four calls against an actor that computes nothing "
          "(transport floor), with the factors passed as direct call arguments and with an explicit "
          f"`ray.put` per factor (`RayExchange.put` uses {_put_style()}). Bytes per transfer = "
          "A_s + A_t + A'_t + ∂ in fp32 (objects ≤ 100 KiB travel inline in the call, larger ones through "
          "the object store). Adapter: L = 2, h = 8.", ""]
    rows = []
    for r in ex_rows:
        rows.append([r["label"], f"{r['shape_t'][0]}×{r['shape_t'][1]} ← {r['shape_s'][0]}×{r['shape_s'][1]}",
                     f"{r['params'] / 1e6:.1f} M", _kib(r["bytes"]), r["reps"],
                     f"{_ms(r['rt_med'])} / {_ms(r['rt_p90'])}", f"{_ms(r['get_med'])} + {_ms(r['fb_med'])}",
                     f"{r['gen_ms']:.1f} + {r['upd_ms']:.1f}",
                     f"{_ms(r['echo_med'])} / {_ms(r['echo_p90'])}",
                     f"{_ms(r['echo_ref_med'])} / {_ms(r['echo_ref_p90'])}"])
    L += bu.table(["link", "A_t ← A_s", "adapter params", "KiB / transfer", "N",
                   "round trip ms (median / p90)", "put+get + feedback ms (median)",
                   "adapter generate + update ms (mean)", "echo, direct args ms (median / p90)",
                   "echo, ray.put ms (median / p90)"], rows)

    L += ["", "### Pair step time: Ray topology vs single-process engine", "",
          f"Pair: ResNet-18 (width 16) → MobileNetV2 (×0.35) on Fashion-MNIST (the offline CIFAR stand-in: "
          f"32×32, grey repeated to 3 channels), batch 64, SGD; MergeNet learned rank-4 layer pair "
          f"`{bu.PAIR_LAYER['source']}` (A_s 4×576) → `{bu.PAIR_LAYER['target']}` (A_t 4×336), adapter "
          f"L = 2, h = 8 ({ex_rows[0]['params'] / 1e6 if ex_rows else float('nan'):.1f} M params), "
          "`update_rule: delta`. "
          f"Each run: {args.epochs} epochs × {args.steps} steps; per-step time = `time/train_s` / steps of each "
          f"epoch after the first (warm-up; no Ray start-up, no evaluation), median over those epochs"
          f"{' and over ' + str(args.repeats) + ' repeats (each repeat runs every config once, in rotated order)' if args.repeats > 1 else ''}; "
          "[min–max] = spread of the per-run medians. Engine: one process, 1 torch thread, both models "
          "and the adapter in turn. Ray: `run_pair_on_ray`, source_workers = target_workers = 1, "
          "cpus_per_worker = 1, adapter actor with 0 CPUs; the time is the target leader's (world rank 0). "
          "*off* = the same pair with `t_cycle` larger than the run: only step 0 transfers, inside the "
          "warm-up epoch. Adapter ms = the hub's `generate` + `update` per transfer (median over epochs).", ""]

    def cell(c):
        r = steps.get(c)
        if not r or not r["steps"]:
            return None
        return statistics.median(r["steps"])

    def spread(c):
        r = steps[c]["rep_medians"]
        return f"[{_ms(min(r))}–{_ms(max(r))}]" if len(r) > 1 else ""

    rows = []
    for c in steps:
        runner, mode, stale, tc = c
        t = cell(c)
        g = _nanmedian(steps[c]["gen"])
        u = _nanmedian(steps[c]["upd"])
        off = cell((runner, "sync", 0, OFF))
        ov = (t - off) / t if (off is not None and tc != OFF) else None
        w = _nanmedian(steps[c].get("wait", []))
        age = _nanmedian(steps[c].get("age", []))
        wr = _nanmedian(steps[c].get("writes", []))
        rows.append([runner, mode if mode == "sync" else f"async, staleness {stale}", _tc(tc),
                     f"{_ms(t)} {spread(c)}".strip(),
                     "–" if tc == OFF or g != g else f"{g:.1f} + {u:.1f}",
                     "–" if tc == OFF or w != w else f"{w:.1f}",
                     "–" if tc == OFF or age != age else f"{age:.2f} / {100 * wr:.0f} %",
                     "–" if ov is None else f"{_ms(t - off)} ms = {100 * ov:.1f} %"])
    L += bu.table(["runner", "exchange", "t_cycle", "ms / pair step", "adapter ms / transfer",
                   "target wait in get, ms / transfer", "age of written output (steps) / transfers written",
                   "transfer overhead (t − t_off) / t"], rows)

    if breakdown:
        b = breakdown
        L += ["", f"Engine step broken into phases (same pair, one process, `t_cycle` 2 so that transfer and "
                  f"plain steps alternate under the same load; medians over {b['n']} steps, {b['n'] // 2} of each kind, "
                  "after 4 warm-up steps):", ""]
        L += bu.table(["phase", "ms"], [
            ["source train step (plain / transfer step)", f"{_ms(b['src_plain'])} / {_ms(b['src_xfer'])}"],
            ["target train step without feedback (plain / transfer step)", f"{_ms(b['tgt_plain'])} / {_ms(b['tgt_xfer'])}"],
            ["put + get: read A_s, A_t, adapter generate, write A'_t", _ms(b["exchange"])],
            ["feedback: Δ to the hub, adapter backward + clip + AdamW", _ms(b["feedback"])],
            ["whole step: plain / transfer", f"{_ms(b['step_plain'])} / {_ms(b['step_xfer'])}"],
        ])
        add = b["exchange"] + b["feedback"]
        L += ["", f"A transfer adds {_ms(add)} ms of adapter work to a {_ms(b['step_plain'])} ms sequential pair step "
                  f"({100 * add / (b['step_plain'] + add):.0f} % of a t_cycle-1 engine step). On Ray the two models run in "
                  f"parallel, so the plain pair step is about max(source, target) = "
                  f"{_ms(max(b['src_plain'], b['tgt_plain']))} ms on idle cores, and the adapter work needs CPU "
                  "that 2 cores do not have spare."]

    L += ["", "Ray / engine, same config, same run:", ""]
    rr = []
    for tc in (1, 5, OFF):
        e, r = cell(("engine", "sync", 0, tc)), cell(("ray", "sync", 0, tc))
        if e and r:
            rr.append([f"sync, t_cycle {_tc(tc)}", _ms(e), _ms(r), f"{r / e:.2f}"])
    L += bu.table(["config", "engine ms / step", "Ray ms / step", "Ray / engine"], rr)

    t1 = cell(("ray", "async", 1, 1))
    off = cell(("ray", "sync", 0, OFF))
    if t1 and off:
        ov = (t1 - off) / t1
        L += ["", f"**Goal check** (transfer overhead ≤ 10 % of the pair step on CPU at t_cycle 1, async): "
                  f"async staleness 1, t_cycle 1: {_ms(t1)} ms/step vs {_ms(off)} ms without transfers → "
                  f"**{100 * ov:.1f} %** — goal {'met' if ov <= 0.10 else 'NOT met'} on this machine in this run."]
        if breakdown:
            b = breakdown
            add = b["exchange"] + b["feedback"]
            L += ["", "Reading: the adapter's own work per transfer "
                      f"({_ms(add)} ms in the engine breakdown: generate + backward/AdamW) is "
                      f"{100 * add / b['tgt_plain']:.0f} % of the target's own step ({_ms(b['tgt_plain'])} ms); the "
                      "transport itself (echo round trip) is a few ms. In sync mode the target waits in `get` for "
                      "`generate` and in `feedback` for the update, so both sit on its critical path. In async "
                      "mode the adapter actor generates and updates on a background thread while the workers "
                      "train, and the target writes the previous transfer's output (age column) instead of "
                      "waiting (wait column). What is left of the overhead is CPU: the adapter's work still runs "
                      f"on the same {machine['nproc']} cores as the two role workers, so it slows them down instead of "
                      "running on a spare core, and a transfer step still reads, writes and copies the factors."]
    return "\n".join(L) + "\n"


def render_record(rec: dict) -> str:
    args = argparse.Namespace(**rec["args"])
    steps = {}
    for k, v in rec["steps"].items():
        runner, mode, stale, tc = k.split("|")
        steps[(runner, mode, int(stale), int(tc))] = v
    return render(args, rec["machine"], rec["load"][0], rec["load"][1], rec["waited"], rec["exchange"], steps,
                  rec["thread_info"], rec["wall_s"], rec["breakdown"])


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few steps (a few minutes)")
    p.add_argument("--out", default=str(bu.ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--epochs", type=int, default=None, help="epochs per pair run (first = warm-up)")
    p.add_argument("--steps", type=int, default=None, help="steps per epoch")
    p.add_argument("--repeats", type=int, default=None, help="runs per pair config (interleaved)")
    p.add_argument("--skip-exchange", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--skip-widths", action="store_true", help="leave out the adapter-width part")
    p.add_argument("--widths-only", action="store_true", help="only the adapter-width part (section "
                                                                  "bench_pair_width; no Ray)")
    p.add_argument("--width", type=int, default=64, help="the small adapter.width compared with the authors' widths")
    p.add_argument("--width-steps", type=int, default=40, help="transfer (and plain) steps timed per width")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the width accuracy comparison")
    p.add_argument("--acc-epochs", type=int, default=None, help="epochs of the accuracy runs (default 2: quickstart)")
    p.add_argument("--acc-steps", type=int, default=None, help="steps per epoch of the accuracy runs (default 20)")
    bu.add_run_args(p, json_help="also dump the raw numbers here")
    args = p.parse_args(argv)
    if args.render_json:
        rec = json.loads(Path(args.render_json).read_text())
        if "bench_pair" in rec or "bench_pair_width" in rec:  # a run with the width part
            for name, fn in (("bench_pair", render_record), ("bench_pair_width", render_widths)):
                if name in rec:
                    bu.show(rec[name], fn, args.out, name, HEADER)
        else:
            bu.show(rec, render_record, args.out, "bench_pair", HEADER)
        return 0
    if args.quick:
        args.seeds = min(args.seeds, 1)
    args.epochs = args.epochs or (3 if args.quick else 4)
    args.steps = args.steps or (6 if args.quick else 12)
    args.repeats = args.repeats or (1 if args.quick else 2)

    def log(msg):
        print(f"[bench_pair {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start = time.perf_counter()
    waited = bu.wait_for_load(args.wait_load, args.max_wait, log=log)
    args.wait_s = time.perf_counter() - t_start
    load0 = bu.loadavg()
    log(f"load average at start {load0}")
    if args.widths_only:
        machine = bu.machine_record()
        rec = run_widths(args, log)
        rec.update({"args": vars(args), "machine": machine, "load": [load0, bu.loadavg()], "waited": waited,
                    "wall_s": time.perf_counter() - t_start})
        if args.json:
            Path(args.json).write_text(json.dumps({"bench_pair_width": rec}, indent=1, default=str))
        bu.show(rec, render_widths, args.out, "bench_pair_width", HEADER)
        log(f"wrote {args.out} (section bench_pair_width) in {rec['wall_s'] / 60:.1f} min")
        return 0
    bu.start_ray(args.num_cpus)
    machine = bu.machine_record()

    @ray.remote(num_cpus=1)
    def worker_threads():
        return torch.get_num_threads()

    thread_info = {"worker": ray.get(worker_threads.remote()),
                   "actor": None}
    ex_rows = []
    if not args.skip_exchange:
        sizes = [("bench pair (late conv → late 1×1 projection)", (4, 336), (4, 576)),
                 ("fmnist_pair.yaml classifiers", (4, 1280), (4, 128))]
        if not args.quick:
            sizes += [("authors' full matrices (resnet50 fc → mbv2 features.16.project)", (160, 960), (100, 2048)),
                      ("rank-4 A of a 512×512×3×3 conv ← into a 128×128×3×3 conv", (4, 1152), (4, 4608))]

        def reps_for(st, ss):
            big = st[0] * st[1] + ss[0] * ss[1] > 20_000
            if args.quick:
                return 10, 2
            return (10, 2) if big else (30, 3)

        ex_rows = bench_exchange(sizes, reps_for, log)
    echo = EchoActor.options(num_cpus=0).remote()
    thread_info["actor"] = ray.get(echo.threads.remote())
    ray.kill(echo)
    steps, breakdown = {}, None
    if not args.skip_steps:
        breakdown = bench_breakdown(20 if args.quick else 40, log)
        with tempfile.TemporaryDirectory(prefix="bench_pair-") as work:
            steps = bench_steps(args, Path(work), log)
    widths = None
    if not args.skip_widths:
        t_w = time.perf_counter()
        load_w = bu.loadavg()
        widths = run_widths(args, log)
        widths.update({"args": vars(args), "machine": machine, "load": [load_w, bu.loadavg()], "waited": waited,
                       "wall_s": time.perf_counter() - t_w})
    load1 = bu.loadavg()
    wall = time.perf_counter() - t_start
    record = {"args": vars(args), "machine": machine, "load": [load0, load1], "waited": waited, "wall_s": wall,
              "thread_info": thread_info, "exchange": ex_rows, "breakdown": breakdown,
              "steps": {"|".join(map(str, k)): v for k, v in steps.items()}}
    if widths is not None:
        bu.show(widths, render_widths, args.out, "bench_pair_width", HEADER)
        if args.json:  # both records in one dump (--render-json rewrites both sections)
            Path(args.json).write_text(json.dumps({"bench_pair": record, "bench_pair_width": widths}, indent=1,
                                                  default=str))
            args.json = None
    bu.publish(record, render_record, args, "bench_pair", HEADER, log)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
