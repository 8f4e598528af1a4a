"""What does the adapter learn from? Its feedback against the true gradient dL/dA'.

For each arm, one pair (ResNet-18 width 16 -> MobileNetV2 x0.35 on Fashion-MNIST, the offline
CIFAR stand-in at 32x32, the study's image setting; SGD 0.05 / momentum 0.9 / weight decay 5e-4
unless the arm says otherwise; frozen source) runs ``--transfers`` transfer steps (``t_cycle``
1) in one process. At every transfer the target's task gradient with respect to the adapter's
output, ``g = dL/dA'``, is computed independently -- ``torch.func.functional_call`` through the
generated weight on the very batch the target then trains on -- and compared with the feedback
the update rule sends the adapter: the ratio ``|feedback| / (eta |g|)`` (``eta`` the target's
current learning rate; for the exact rule, where the feedback is ``g`` itself, ``|feedback| /
|g|``) and the cosine. A clean signal has ratio 1 and cosine 1 at every transfer.

Writes ``benchmarks/results/feedback_probe.json`` and the section "Learning signal, measured"
of ``docs/METHOD.md``. Nothing is timed; the load average is recorded anyway.

    python benchmarks/feedback_probe.py [--transfers 8] [--source-init PATH]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402  (sets thread/env defaults before torch loads)

import torch  # noqa: E402

SVD = {"source": "layer4.1.conv2.weight", "target": "features.16.project.conv.weight", "mode": "svd", "rank": 4}
FULL = {"source": "fc.weight", "target": "features.16.project.conv.weight", "mode": "full"}
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
ADAMW = {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01}
ADAPTER = {"layers": 1, "heads": 4, "width": 64, "lr": 1e-3}

#: arm -> (update rule, layer pair, target optimiser, adapter options); the first three are the
#: former defaults the issue measured, the last three the project's defaults now
ARMS = {
    "delta, svd, output_scale none (the former study arm)": ("delta", {**SVD, "output_scale": "none"}, SGD, ADAPTER),
    "delta, same, weight decay 0": ("delta", {**SVD, "output_scale": "none"}, {**SGD, "weight_decay": 0.0}, ADAPTER),
    "delta, svd, output_scale rms": ("delta", {**SVD, "output_scale": "rms"}, SGD, ADAPTER),
    "authors' full-matrix arm (preset: authors, delta)": (None, {**FULL, "output_scale": "none"}, SGD,
                                                         {"preset": "authors", "lr": 1e-3}),
    "delta, svd, output_scale rms, AdamW target": ("delta", {**SVD, "output_scale": "rms"}, ADAMW, ADAPTER),
    "exact (default), svd, rms": ("exact", SVD, SGD, ADAPTER),
    "exact (default), svd, rms, AdamW target": ("exact", SVD, ADAMW, ADAPTER),
    "exact (default), preset: authors + update_rule exact, full": ("exact", FULL, SGD, {"preset": "authors", "lr": 1e-3}),
}


def arm_config(rule, layer_pair, optimiser, adapter, source_init, seed) -> dict:
    task = bu.fashion_task(1000, 500)
    opts = {"t_cycle": 1, "freeze_source": True, "layer_pairs": [layer_pair], "adapter": adapter}
    if rule is not None:
        opts["update_rule"] = rule
    source = {"model": {"name": "resnet18", "options": {"width": 16}}, "task": task}
    if source_init:
        source["init_from"] = source_init
    return {"name": "feedback-probe", "seed": seed, "device": "cpu", "source": source,
            "target": {"model": {"name": "mobilenetv2", "options": {"width_mult": 0.35}}, "task": task},
            "recipe": {"optimizer": optimiser, "schedule": {"name": "cosine"}, "epochs": 4, "batch_size": 64,
                       "eval_batch_size": 500, "augment": False},
            "method": {"name": "mergenet", "options": copy.deepcopy(opts)}}


def probe(cfg_dict: dict, transfers: int) -> list[dict]:
    from mergenet_core.config.checks import parse_config
    from mergenet_core.training.loop import PairState
    from mergenet_core.methods.mergenet import Exchange
    from mergenet_core.training.step import step_roles, train_roles

    class Recording(Exchange):
        def __init__(self, hub):
            super().__init__(hub)
            self.out, self.fb = {}, {}

        def get(self, step, role):
            gen, out = super().get(step, role)
            self.out[gen] = {k: v.clone() for k, v in out.items() if v is not None}
            return gen, out

        def feedback(self, gen_step, grads, epoch):
            self.fb[gen_step] = {k: v.detach().clone() for k, v in grads.items()}
            super().feedback(gen_step, grads, epoch)

    pair = PairState.build(parse_config(cfg_dict))
    m = pair.method
    ex = Recording(m.exchange.hub)
    m.attach(ex)
    tgt = pair.roles["target"]
    enc = m.enc[("target", cfg_dict["method"]["options"]["layer_pairs"][0]["target"])]
    rule = m.options.update_rule
    rows = []
    for step in range(transfers):
        m.before_step(step, step_roles(pair))  # t_cycle 1: a transfer
        leaf = ex.out[step]["0"].clone().requires_grad_(True)
        state = tgt.stream.state_dict()
        x, y = tgt.next_batch()
        tgt.stream.load_state_dict(state)
        buffers = {n: b.clone() for n, b in tgt.model.named_buffers()}
        tgt.model.train()
        with tgt.rng_scope():
            loss, _ = tgt.loss(x, y, params={**buffers, **enc.override(leaf)})
        (g,) = torch.autograd.grad(loss, leaf)
        lr = tgt.optimizer.param_groups[0]["lr"]
        train_roles(pair, step)
        fb = ex.fb[step]["0"]
        scale = lr if rule == "delta" else 1.0
        rows.append({"transfer": step + 1, "rule": rule, "lr": lr,
                     "ratio": float(fb.norm() / (scale * g.norm())),
                     "cos": float(torch.nn.functional.cosine_similarity(fb.flatten(), g.flatten(), dim=0)),
                     "write_change": enc.last_write_change})
    return rows


def render(rec: dict) -> str:
    at = [t for t in (1, 4, 8, 16, 32) if t <= rec["transfers"]]
    head = (["arm (update rule, layer pair, target optimiser)"] + [f"transfer {t}: ratio, cos" for t in at]
            + [f"lowest cos, transfers 1–{rec['transfers']}"])
    rows = []
    for arm, trace in rec["arms"].items():
        by = {r["transfer"]: r for r in trace}
        rows.append([arm] + [f"{by[t]['ratio']:.3g}, {by[t]['cos']:+.3f}" for t in at]
                    + [f"{min(r['cos'] for r in trace):+.5f}"])
    m = rec["machine"]
    lines = [
        "*Written by `python benchmarks/feedback_probe.py` "
        f"(`--transfers {rec['transfers']}`{', `--source-init`' if rec['source_init'] else ''}); "
        f"commit {m.get('git', '?')}, {m.get('cpu', '?')}, load {rec['load_start'][0]:.2f} at the start.*", "",
        "Pair: ResNet-18 (width 16) → MobileNetV2 ×0.35 on **Fashion-MNIST** (32×32, grey repeated to 3 channels; "
        "1,000 training images), frozen source "
        f"({'trained: ' + rec['source_init'] if rec['source_init'] else 'at its random initialisation'}), `t_cycle` 1, "
        "svd rank 4 `layer4.1.conv2.weight` → `features.16.project.conv.weight` (full mode: `fc.weight` → the same "
        "layer), adapter L = 1, h = 4, width 64 (authors' preset: their adapter); target SGD 0.05 / momentum 0.9 / "
        "weight decay 5e-4 unless the arm says AdamW (5e-4, decay 0.01). *ratio* = |feedback| / (η ‖∂L/∂A′‖) for "
        "`delta`, |feedback| / ‖∂L/∂A′‖ for `exact`; *cos* = cosine of the feedback with ∂L/∂A′, computed "
        "independently through the generated weight (`torch.func.functional_call`) on the batch the target then "
        "trains on. A clean signal reads 1, +1.000.", "",
        *bu.table(head, rows)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transfers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source-init", default=None, help="a trained source (mergenet train folder) to start from")
    ap.add_argument("--out", default=str(bu.ROOT / "docs" / "METHOD.md"))
    ap.add_argument("--json", default=str(bu.ROOT / "benchmarks" / "results" / "feedback_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rec = {"transfers": args.transfers, "source_init": args.source_init, "machine": bu.machine_record(),
           "load_start": bu.loadavg(), "arms": {}}
    for arm, (rule, lp, opt, ad) in ARMS.items():
        rec["arms"][arm] = probe(arm_config(rule, lp, opt, ad, args.source_init, args.seed), args.transfers)
        last = rec["arms"][arm][-1]
        print(f"{arm}: transfer {last['transfer']} ratio {last['ratio']:.3g} cos {last['cos']:+.3f}", flush=True)
    rec["wall_s"] = time.perf_counter() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    import json

    Path(args.json).write_text(json.dumps(rec, indent=1, default=str))
    from orchestrator.tracking.publish import write_section

    write_section(args.out, "Learning signal, measured", render(rec))
    print(render(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
