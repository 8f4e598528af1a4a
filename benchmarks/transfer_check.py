#!/usr/bin/env python
"""Transfer check on the quickstart image pair (ResNet-18 -> MobileNetV2 on Fashion-MNIST).

    python benchmarks/transfer_check.py [--seeds 0 1 2] [--epochs 3] [--steps 40] [--json FILE]

Two measurements with the single-process engine, sequentially:

1. **Factor stability** (``svd`` mode, the quickstart's layer pair): the per-link diagnostics
   ``transfer/0/{receiver,provider}_factor_cos`` (mean row cosine between consecutive transfers'
   factors) and ``transfer/0/write_change`` with the alignment off (``align: false``, a fresh
   SVD per transfer, as before) and on (the default), seed 0.
2. **Arms** on the same layer pair: ``alone``, ``mergenet`` and ``mergenet`` with the
   ``untrained_source`` control, one run per seed; target test accuracy at the final epoch and
   at the best-validation epoch (never selected on test), and per-seed differences.

The layer pair is the earlier quickstart's (pair ``img-r18-mbv2``, kept in ``benchmarks/transfer_check.yaml``):
source ``fc.weight`` -> target ``features.16.project.conv.weight``, a 1x1 projection followed
by BatchNorm. Data: Fashion-MNIST (32x32, grey repeated to 3 channels), not CIFAR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mergenet_core.config import deep_merge, read_yaml  # noqa: E402
from orchestrator.config import parse_config  # noqa: E402
from mergenet_core.training.engine import Engine  # noqa: E402
from orchestrator.tracking.paired import t_interval  # noqa: E402  (the report's own Student-t interval)


def pair_config(grid: dict, method: dict, seed: int, epochs: int, steps: int) -> dict:
    pair = next(p for p in grid["pairs"] if p["name"] == "img-r18-mbv2")
    cfg = deep_merge(grid["base"], {"name": f"check-{method['name']}", "seed": seed, "device": "cpu",
                                    "source": pair["source"], "target": pair["target"]})
    cfg["recipe"] = deep_merge(cfg["recipe"], {"epochs": epochs, "steps_per_epoch": steps})
    cfg["method"] = method
    return cfg


def mergenet(grid: dict, **extra) -> dict:
    pair = next(p for p in grid["pairs"] if p["name"] == "img-r18-mbv2")
    opts = deep_merge(grid["methods"]["mergenet"], {"layer_pairs": pair["layer_pairs"]})
    return {"name": "mergenet", "options": deep_merge(opts, extra)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    grid = read_yaml(Path(__file__).with_suffix(".yaml"))  # the earlier quickstart's image pair
    out: dict = {"load_avg_start": os.getloadavg()[0], "epochs": args.epochs, "steps": args.steps,
                 "seeds": args.seeds, "stability": {}, "arms": {}}
    work = Path(tempfile.mkdtemp(prefix="mergenet-check-"))
    t0 = time.time()
    for align in (False, True):
        lp = [dict(p, align=align) for p in next(p for p in grid["pairs"] if p["name"] == "img-r18-mbv2")["layer_pairs"]]
        cfg = pair_config(grid, mergenet(grid, layer_pairs=lp), 0, args.epochs, args.steps)
        Engine(parse_config(cfg), work / f"align-{align}", progress=False).run()
        recs = [json.loads(l) for l in (work / f"align-{align}" / "metrics.jsonl").read_text().splitlines()]
        keys = ("transfer/0/receiver_factor_cos", "transfer/0/provider_factor_cos", "transfer/0/write_change")
        out["stability"][f"align={align}"] = {k.split("/")[-1]: [round(r[k], 4) for r in recs] for k in keys}
        print(f"align={align}: " + json.dumps(out["stability"][f"align={align}"]), flush=True)
    arms = {"alone": {"name": "alone", "options": {}}, "mergenet": mergenet(grid),
            "untrained_source": mergenet(grid, control="untrained_source")}
    for arm, method in arms.items():
        for seed in args.seeds:
            cfg = pair_config(grid, method, seed, args.epochs, args.steps)
            final = Engine(parse_config(cfg), work / f"{arm}-s{seed}", progress=False).run()
            out["arms"].setdefault(arm, {})[seed] = {k: final[k] for k in (
                "target/final_test_acc", "target/test_acc_at_best_val")}
            print(f"{arm} seed {seed}: {out['arms'][arm][seed]}", flush=True)
    out["wall_s"] = round(time.time() - t0, 1)
    out["load_avg_end"] = os.getloadavg()[0]
    lines = ["| arm | final test acc % (mean ± sd) | test acc % at best-val epoch | − alone, final [95 % CI] | − untrained_source, final [95 % CI] |",
             "|---|---|---|---|---|"]
    for arm, per in out["arms"].items():
        f = [100 * per[s]["target/final_test_acc"] for s in args.seeds]
        b = [100 * per[s]["target/test_acc_at_best_val"] for s in args.seeds]
        cells = []
        for ref in ("alone", "untrained_source"):
            if ref == arm:
                cells.append("–")
                continue
            d = [100 * (per[s]["target/final_test_acc"] - out["arms"][ref][s]["target/final_test_acc"]) for s in args.seeds]
            m, _, lo, hi = t_interval(d)
            cells.append(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        sd = statistics.stdev(f) if len(f) > 1 else 0.0
        sdb = statistics.stdev(b) if len(b) > 1 else 0.0
        lines.append(f"| {arm} | {statistics.fmean(f):.1f} ± {sd:.1f} | {statistics.fmean(b):.1f} ± {sdb:.1f} | "
                     + " | ".join(cells) + " |")
    out["table"] = "\n".join(lines)
    print(out["table"])
    print(f"wall {out['wall_s']} s, load average {out['load_avg_start']:.2f} -> {out['load_avg_end']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
