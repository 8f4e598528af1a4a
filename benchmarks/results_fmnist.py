#!/usr/bin/env python
"""The Fashion-MNIST results study: alone / mergenet / kd / dml / param_share x seeds.

    python benchmarks/results_fmnist.py [--seeds 0 1 2] [--out runs/results_fmnist]

Runs every method x seed of ``experiments/results_fmnist.yaml`` sequentially with the
single-process :class:`~mergenet_core.training.engine.Engine` (a run whose ``final.json`` exists is
skipped; an interrupted run resumes from its checkpoint), then writes the table into
``docs/RESULTS.md`` between ``<!-- results_fmnist:start -->`` and
``<!-- results_fmnist:end -->`` (the rest of the file is left as it is).

Nothing is selected on the test set: the "best" column takes the test accuracy at the epoch
with the highest *validation* accuracy (validation = 10% carved from the training subset).
``--report-only`` rewrites the table from the runs already on disk.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mergenet_core.config import read_yaml  # noqa: E402
from orchestrator.config import parse_config  # noqa: E402
from mergenet_core.training.engine import FINAL, METRICS, Engine, PairState  # noqa: E402

BASE = ROOT / "experiments" / "results_fmnist.yaml"
RESULTS = ROOT / "docs" / "RESULTS.md"
START, END = "<!-- results_fmnist:start -->", "<!-- results_fmnist:end -->"
ORDER = ("alone", "mergenet", "kd", "dml", "param_share")


def method_blocks(base: dict) -> dict[str, dict]:
    """The ``method`` block of every compared method, fixed a priori (never tuned on test).

    mergenet: as in the base YAML. kd: Hinton KD, T=4, weight 0.9 on the KD term, the teacher
    trained online beside the student (train_source: true). dml: the defaults (mutual KL
    weight 1, T=1). param_share: the same layer pair as mergenet, whole matrix (full mode),
    bilinearly resized and RMS-matched, replacing the target weight (mix 1) every t_cycle
    steps, with mergenet's t_cycle.
    """
    mn = copy.deepcopy(base["method"])
    opts = mn.get("options", {})
    pairs = [{"source": lp["source"], "target": lp["target"]} for lp in opts["layer_pairs"]]
    return {
        "alone": {"name": "alone", "options": {}},
        "mergenet": mn,
        "kd": {"name": "kd", "options": {"temperature": 4.0, "weight": 0.9, "train_source": True}},
        "dml": {"name": "dml", "options": {"weight": 1.0, "temperature": 1.0}},
        "param_share": {"name": "param_share", "options": {
            "layer_pairs": pairs, "t_cycle": int(opts.get("t_cycle", 1)), "mix": 1.0, "rescale": True}},
    }


def build_config(base: dict, method: str, seed: int):
    data = copy.deepcopy(base)
    data["method"] = method_blocks(base)[method]
    data["seed"] = seed
    data["name"] = f"{base.get('name', 'results-fmnist')}-{method}"
    return parse_config(data)


def param_counts(pair: PairState) -> dict[str, int]:
    out = {f"params/{n}": sum(p.numel() for p in r.model.parameters()) for n, r in pair.roles.items()}
    ex = getattr(pair.method, "exchange", None)
    if ex is not None and hasattr(ex, "hub"):
        out["params/adapter"] = sum(ex.hub.param_counts().values())
    return out


def run_one(base: dict, method: str, seed: int, out: Path) -> None:
    run_dir = out / method / f"s{seed}"
    if (run_dir / FINAL).exists():
        print(f"[skip] {method} seed {seed}: {run_dir / FINAL} exists", flush=True)
        return
    cfg = build_config(base, method, seed)
    t0 = time.perf_counter()
    load0 = os.getloadavg()

    def on_epoch(r: dict) -> None:
        keys = ("target/train_acc", "target/val_acc", "source/val_acc", "adapter/skipped")
        shown = " ".join(f"{k}={r[k]:.4g}" for k in keys if k in r)
        print(f"  {method} s{seed} epoch {r['epoch']}: {shown} ({r.get('time/epoch_s', 0):.0f}s)", flush=True)

    engine = Engine(cfg, run_dir, progress=False, on_epoch=on_epoch)
    meta = {"method": method, "seed": seed, **param_counts(engine.pair),
            "started": dt.datetime.now().isoformat(timespec="seconds"), "loadavg_start": load0,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    resumed = (run_dir / "checkpoint.pt").exists()
    print(f"[run] {method} seed {seed} -> {run_dir}{' (resuming)' if resumed else ''}", flush=True)
    final = engine.run(resume=True)
    meta.update({"process_wall_s": time.perf_counter() - t0, "loadavg_end": os.getloadavg(),
                 "resumed": resumed, "ended": dt.datetime.now().isoformat(timespec="seconds")})
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"[done] {method} seed {seed}: target final test {final.get('target/final_test_acc', float('nan')):.4f}, "
          f"at best val {final.get('target/test_acc_at_best_val', float('nan')):.4f}, "
          f"{final.get('wall_s', 0):.0f}s", flush=True)


# --------------------------------------------------------------------------- report


def _ms(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not xs:
        return "–"
    m = statistics.fmean(xs) * scale
    if len(xs) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs) * scale:.{digits}f}"


def _read(run_dir: Path) -> tuple[dict, dict, list[dict]] | None:
    if not (run_dir / FINAL).exists():
        return None
    final = json.loads((run_dir / FINAL).read_text())
    meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
    hist = [json.loads(l) for l in (run_dir / METRICS).read_text().splitlines() if l.strip()] \
        if (run_dir / METRICS).exists() else []
    return final, meta, hist


def _fmt_s(x: float) -> str:
    return f"{x / 60:.1f} min" if x >= 120 else f"{x:.0f} s"


def make_section(base: dict, seeds: list[int], out: Path, command: str, total_wall_s: float | None) -> str:
    cfg0 = build_config(base, "mergenet", seeds[0])
    rows, per_run = [], []
    adapter_params = None
    mn_params: dict[str, int] = {}
    role_params: dict[str, int] = {}
    odd: list[str] = []
    for m in ORDER:
        runs = [(s, _read(out / m / f"s{s}")) for s in seeds]
        runs = [(s, r) for s, r in runs if r is not None]
        if not runs:
            rows.append(f"| {m} | – | – | – | – | – | – | 0 |")
            continue
        tf = [r[0]["target/final_test_acc"] for _, r in runs]
        tb = [r[0]["target/test_acc_at_best_val"] for _, r in runs]
        ep = [r[0]["target/best_val_epoch"] for _, r in runs]
        wall = [r[0]["wall_s"] for _, r in runs]
        has_src = all("source/final_test_acc" in r[0] for _, r in runs)
        sf = [r[0]["source/final_test_acc"] for _, r in runs] if has_src else []
        sb = [r[0]["source/test_acc_at_best_val"] for _, r in runs] if has_src else []
        rows.append(f"| {m} | {_ms(tf)} | {_ms(tb)} | {', '.join(str(e) for e in ep)} | "
                    f"{_ms(sf) if has_src else '– (no source)'} | {_ms(sb) if has_src else '–'} | "
                    f"{_fmt_s(statistics.fmean(wall))} | {len(runs)} |")
        for s, (final, meta, hist) in runs:
            skipped = sum(int(h.get("adapter/skipped", 0)) for h in hist)
            vals = [v for h in hist for k, v in h.items() if isinstance(v, float) and k.endswith(("loss", "acc"))]
            if any(v != v or v in (float("inf"), float("-inf")) for v in vals):
                odd.append(f"{m} seed {s}: non-finite loss/accuracy in metrics.jsonl")
            if skipped:
                odd.append(f"{m} seed {s}: {skipped} adapter transfers skipped (non-finite output)")
            la = meta.get("loadavg_start")
            src = f"{100 * final['source/final_test_acc']:.2f}" if "source/final_test_acc" in final else "–"
            per_run.append(
                f"| {m} | {s} | {100 * final['target/final_test_acc']:.2f} | "
                f"{100 * final['target/best_val_acc']:.2f} (ep {final['target/best_val_epoch']}) | "
                f"{100 * final['target/test_acc_at_best_val']:.2f} | {src} | {final['wall_s']:.0f} | "
                f"{f'{la[0]:.1f}' if la else '–'} |")
            if m == "mergenet" and "params/adapter" in meta:
                adapter_params = meta["params/adapter"]
                mn_params = {k.split("/")[1]: v for k, v in meta.items() if k.startswith("params/")}
            if m in ("kd", "dml", "param_share"):  # the unmodified models
                for k in ("params/source", "params/target"):
                    if k in meta:
                        role_params[k.split("/")[1]] = meta[k]

    if adapter_params is None:
        pc = param_counts(PairState.build(cfg0))
        adapter_params = pc.get("params/adapter")
        mn_params = {k.split("/")[1]: v for k, v in pc.items()}
    if len(role_params) < 2:
        pc = param_counts(PairState.build(build_config(base, "kd", seeds[0])))
        role_params = {"source": pc["params/source"], "target": pc["params/target"]}

    t = cfg0.target
    s_ = cfg0.source
    topts = t.task.options
    n_train = topts.get("train_subset")
    n_val = round(topts.get("val_fraction", 0.1) * n_train) if n_train else None
    r = t.recipe
    o = r.optimizer
    mb = method_blocks(base)
    lp = mb["mergenet"]["options"]["layer_pairs"]
    ad = cfg0.method.options.get("adapter", {})
    from mergenet_core.methods.mergenet import AdapterOptions
    ado = AdapterOptions(**ad)
    today = dt.date.today().isoformat()
    threads = sorted({json.loads((out / m / f"s{s}" / "meta.json").read_text()).get("threads")
                      for m in ORDER for s in seeds if (out / m / f"s{s}" / "meta.json").exists()} - {None})
    threads = "/".join(map(str, threads)) or str(torch.get_num_threads())
    cpu = os.cpu_count()
    loads = []
    for m in ORDER:
        for s in seeds:
            p = out / m / f"s{s}" / "meta.json"
            if p.exists():
                la = json.loads(p.read_text()).get("loadavg_start")
                if la:
                    loads.append(la[0])
    lines = [
        START,
        "## Fashion-MNIST: ResNet-18 (narrow) → MobileNetV2 ×0.35, five methods, "
        f"{len(seeds)} seeds",
        "",
        f"**Data set: Fashion-MNIST** (offline stand-in for CIFAR; 32×32 zero-padded, grey×3, "
        f"{n_train} train images per seed, of which {n_val} are held out as the validation split, "
        f"so {n_train - n_val} are trained on; test = a fixed class-stratified subset of "
        f"{topts.get('test_subset') or 10000} of the 10,000 official test images, the same items for every run). "
        "**These are not CIFAR-100 numbers**, and not comparable with the paper's tables.",
        "",
        f"- Produced by: `{command}` (one process, the single-process `Engine`, runs in sequence; "
        f"outputs under `{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}`). Written {today}.",
        f"- Machine: {cpu} CPU cores ({platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, torch {torch.__version__}, {threads} intra-op thread(s)), no GPU, "
        "**shared with other work running at the same time** (1-min load average at the start of the runs: "
        + (f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded")
        + "), so wall times are noisy and only roughly comparable between methods."
        + (f" Whole study: {_fmt_s(total_wall_s)}." if total_wall_s else ""),
        f"- Budget: {r.epochs} epochs × {n_train - n_val} training images "
        f"({(n_train - n_val) // r.batch_size} steps of batch {r.batch_size} per epoch, last partial batch "
        "dropped) per model per run; validation and test evaluated after every epoch.",
        f"- Source: `{s_.model.name}` {s_.model.options} ({role_params['source']:,} parameters); "
        f"target: `{t.model.name}` {t.model.options} ({role_params['target']:,} parameters). "
        "Both from scratch (no pretrained weights); the source trains online beside the target "
        "for every method except `alone`.",
        f"- Recipe (both models, every method): SGD lr {o.lr}, momentum {o.momentum}, weight decay "
        f"{o.weight_decay} (none on biases/norms), {r.schedule.name} schedule per step, batch {r.batch_size}, "
        f"augmentation {'random crop (pad 4) + horizontal flip' if r.augment else 'none'}, fp32.",
        f"- mergenet: layer pair `{lp[0]['source']}` → `{lp[0]['target']}`, mode `{lp[0].get('mode', 'learned')}`, "
        f"rank {lp[0].get('rank', 4)}, output scale `{lp[0].get('output_scale', 'rms')}`, "
        f"T_cycle {cfg0.method.options.get('t_cycle', 1)}, update rule `{cfg0.method.options.get('update_rule', 'delta')}`; "
        f"adapter L={ado.layers}, h={ado.heads}, AdamW lr {ado.lr}, wd {ado.weight_decay}, clip {ado.grad_clip}, "
        f"{ado.schedule} schedule over the transfers — the defaults. "
        f"**Adapter parameters: {adapter_params:,}** "
        f"({adapter_params / role_params['target']:.1f}× the target it writes into; dropped at inference). "
        "In `learned` mode *both* paired layers are rank-4 factorised layers (`B·A`) for the whole run, "
        f"so in the mergenet runs the source has {mn_params.get('source', 0):,} and the target "
        f"{mn_params.get('target', 0):,} parameters: neither model is architecturally identical to the "
        "one the other methods train.",
        f"- kd: {json.dumps(mb['kd']['options'])} (Hinton KD from a teacher trained online from scratch). "
        f"dml: {json.dumps(mb['dml']['options'])}. param_share: {json.dumps(mb['param_share']['options'])} "
        "(whole source matrix, bilinearly resized to the target's shape and RMS-matched, copied in).",
        "- Hyperparameters were fixed before running; nothing was selected on the test set. "
        "\"@ best-val\" is the test accuracy at the epoch with the highest validation accuracy "
        "(ties → earliest); \"@ final\" is the last epoch. Mean ± sample std (n−1) over seeds; "
        "each seed draws its own training subset, validation split, initialisation and batch order "
        "(the same for every method at that seed).",
        "",
        "| method | target test acc @ final epoch (%) | target test acc @ best-val epoch (%) | "
        "best-val epoch(s) | source test acc @ final (%) | source test acc @ best-val (%) | "
        "wall time per run (mean) | n seeds |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Wall time per run is the engine's `wall_s` (training + per-epoch evaluation of every trained "
        "model on val and test; model building and data loading excluded).",
        "",
        "<details><summary>Per run</summary>",
        "",
        "| method | seed | target test @ final | target best val (epoch) | target test @ best val | "
        "source test @ final | wall s | load avg at start |",
        "|---|---|---|---|---|---|---|---|",
        *per_run,
        "",
        "</details>",
        "",
    ]
    if odd:
        lines += ["Anomalies recorded: " + "; ".join(odd) + ".", ""]
    lines.append(END)
    return "\n".join(lines)


def write_results(section: str, path: Path = RESULTS) -> None:
    if path.exists():
        text = path.read_text()
    else:
        text = ("# Results\n\nMeasured results of this repository's experiments. Each section is written by the "
                "command it names; re-running that command replaces only its own section.\n")
    if START in text and END in text and text.index(START) < text.index(END):
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/results_fmnist")
    p.add_argument("--config", default=str(BASE.relative_to(ROOT)))
    p.add_argument("--methods", nargs="+", default=list(ORDER), choices=ORDER)
    p.add_argument("--report-only", action="store_true", help="only rewrite the docs/RESULTS.md section")
    p.add_argument("--results", default=str(RESULTS.relative_to(ROOT)), help="the Markdown file to write")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on the shared 2-core machine, 2 threads were "
                        "~10x slower per step than 1 under contention, from OpenMP oversubscription)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    base = read_yaml(cfg_path)
    for m in args.methods:  # validate every config before the first run starts
        for s in args.seeds:
            build_config(base, m, s)
    t0 = time.perf_counter()
    if not args.report_only:
        for s in args.seeds:
            for m in args.methods:
                run_one(base, m, s, out)
    total = None if args.report_only else time.perf_counter() - t0
    if total is not None:
        (out / "study.json").write_text(json.dumps({"total_wall_s": total, "seeds": args.seeds,
                                                    "methods": args.methods,
                                                    "ended": dt.datetime.now().isoformat(timespec="seconds")}))
    elif (out / "study.json").exists():
        total = json.loads((out / "study.json").read_text()).get("total_wall_s")
    command = "python benchmarks/results_fmnist.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                       " " + " ".join(sys.argv[1:] if argv is None else argv))
    command = command.replace(" --report-only", "")
    res = Path(args.results) if Path(args.results).is_absolute() else ROOT / args.results
    write_results(make_section(base, args.seeds, out, command, total), res)
    print(f"wrote {res}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
