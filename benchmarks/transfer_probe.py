"""Why do MergeNet's writes lose where a transplant gains? Setting (a) of the study, probed.

Setting (a) (experiments/study/a_same_arch.yaml): the same small CNN as donor and target on
Fashion-MNIST, the donor trained on 20,000 images (the study's cached source; trained here if
missing), the target from scratch on 1,000. One seed (``--seed``, default 300: none of the
study's pilot, search or verdict seeds), in one process; nothing here is a verdict -- the
verdicts are the study's (docs/RESULTS.md). Three measurements:

1. **Where a pass-through would write.** For each conv, what a perfect adapter that passes the
   source's matrix through writes: in ``svd`` mode the source factor ``A_s`` lands in the
   *target's* basis (``W_t + B_t (A_s - A_t)``), in ``full`` mode the donor's weight itself. Its
   cosine with the donor's weight (and with the donor's own top-r part) says whether the source's
   knowledge can arrive at all.
2. **Training traces.** Arms trained for the study's 12 epochs: per link, the cosine of the written
   matrix with the source matrix the adapter saw (first and last transfer), the relative change
   each write makes, the gate and the source-anchored departure ``d``, and the final test
   accuracy (one seed: a trace, not a comparison).
3. **Which block carries source information.** On each arm's trained adapter and its last
   inputs: the change of the written matrix when the source matrix is replaced by the shuffled
   control's (rows and columns permuted) in one place only -- one of the four cross attentions
   (target rows × source rows / columns, target columns × source rows / columns), the anchor
   term, or everywhere -- relative to the size of the write ``|X' - X|``.

Writes ``benchmarks/results/transfer_probe.json`` and the section "Why MergeNet's writes lose
where a transplant gains" of docs/METHOD.md. Nothing is timed; the load average is recorded.

    python benchmarks/transfer_probe.py [--seed 300]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402  (sets thread/env defaults before torch loads)

import torch  # noqa: E402

STUDY = bu.ROOT / "experiments" / "study" / "a_same_arch.yaml"
CONVS = [f"features.{i}.conv.weight" for i in range(3)]


def lp(mode: str, rank: int = 4) -> list[dict]:
    return [{"source": c, "target": c, "mode": mode, **({"rank": rank} if mode == "svd" else {})} for c in CONVS]


ADAPTER = {"layers": 1, "heads": 4, "width": 32, "lr": 1e-2}
#: arm -> method options (frozen trained source)
ARMS = {
    "svd r4, every conv, ungated, t_cycle 2 (the issue's probe)": {"t_cycle": 2, "layer_pairs": lp("svd"),
                                                                    "adapter": ADAPTER},
    "svd r4, every conv, gated, t_cycle 2": {"t_cycle": 2, "layer_pairs": lp("svd"),
                                             "adapter": {**ADAPTER, "gate": True}},
    "full, every conv, gated, t_cycle 2": {"t_cycle": 2, "layer_pairs": lp("full"),
                                           "adapter": {**ADAPTER, "gate": True}},
    "full, every conv, source-anchored, gate from 1, t_cycle 16 (the fix tried)": {
        "t_cycle": 16, "layer_pairs": lp("full"),
        "adapter": {**ADAPTER, "gate": True, "gate_init": 1.0, "anchor": "source"}},
}


def study_configs(seed: int) -> tuple[dict, Path]:
    """The study's pair config (``alone`` trial dict) and its donor's folder (trained if missing)."""
    from orchestrator.grid.load import load_grid
    from orchestrator.grid.sources import train_missing

    grid = load_grid(STUDY, deep=False)
    train_missing(*grid.source_plan())
    d = grid.trial_dict("cnn-cnn", "mergenet", seed)
    d.pop("ray", None)  # the core loop runs here, in this process
    d["name"] = "transfer-probe"
    d["device"] = "cpu"
    return d, Path(d["source"]["init_from"] if isinstance(d["source"]["init_from"], str)
                   else d["source"]["init_from"]["path"])


def passthrough_check(cfg: dict) -> list[dict]:
    """Measurement 1 on the donor and a target at its seed's initialisation."""
    from mergenet_core.config.checks import parse_config
    from mergenet_core.lowrank import conv_to_matrix, make_encoding
    from mergenet_core.training.loop import PairState

    pair = PairState.build(parse_config({**cfg, "method": {"name": "mergenet", "options": {
        "freeze_source": True, "layer_pairs": lp("svd"), "adapter": ADAPTER}}}))
    src, tgt = pair.roles["source"].model, pair.roles["target"].model
    rows = []
    for c in CONVS:
        w_s = conv_to_matrix(dict(src.named_parameters())[c].detach())
        e_s = make_encoding(copy.deepcopy(src), c, "svd", 4, None, field="probe", align=False)
        e_t = make_encoding(copy.deepcopy(tgt), c, "svd", 4, None, field="probe", align=False)
        a_s, a_t = e_s.read(), e_t.read()
        b_s = e_s.factors[0]
        top_s = b_s @ a_s
        e_t.write(a_s)  # a perfect pass-through in svd mode
        w_svd = e_t.dense_matrix()
        cos = torch.nn.functional.cosine_similarity
        rows.append({"layer": c, "shape": list(w_s.shape),
                     "svd_cos_donor": float(cos(w_svd.flatten(), w_s.flatten(), dim=0)),
                     # the part the write replaced: B_t A_s, against the donor's own B_s A_s
                     "svd_cos_donor_top4": float(cos((e_t.factors[0] @ a_s).flatten(), top_s.flatten(), dim=0)),
                     "donor_top4_energy": float(top_s.norm() ** 2 / w_s.norm() ** 2),
                     "full_cos_donor": 1.0})
    return rows


def train_arm(cfg: dict, options: dict, seed: int) -> dict:
    """Measurements 2 and 3 for one arm."""
    from mergenet_core.config.checks import parse_config
    from mergenet_core.training.loop import PairState
    from mergenet_core.training.step import take_step

    d = copy.deepcopy(cfg)
    d["method"] = {"name": "mergenet", "options": {"freeze_source": True, **copy.deepcopy(options)}}
    pair = PairState.build(parse_config(d))
    m = pair.method
    hub = m.exchange.hub
    seen: dict[str, tuple] = {}
    first_cos: dict[str, float] = {}
    orig = hub.generate

    def generate(step, inputs, snapshot=False):
        for lid, t in inputs.items():
            seen[lid] = tuple(v.detach().clone() for v in t if v is not None)
        out = orig(step, inputs, snapshot)
        for lid, new in out.items():
            x, y = seen[lid][:2]
            if new is not None and lid not in first_cos and new.shape == y.shape:
                first_cos[lid] = float(torch.nn.functional.cosine_similarity(new.flatten(), y.flatten(), dim=0))
        return out

    hub.generate = generate
    epochs, spe = pair.cfg.target.recipe.epochs, pair.steps_per_epoch
    trace = []
    for epoch in range(epochs):
        for k in range(spe):
            take_step(pair, epoch * spe + k)
        trace.append({"epoch": epoch + 1, **m.epoch_metrics(), **m.role_metrics()})
    final = pair.evaluate()
    # measurement 3: the last inputs, the shuffled control's source matrix fed in one place at a time
    from mergenet_core.methods.mergenet.adapter import BLOCKS
    from mergenet_core.training.roles import derive_seed

    ablation = {}
    for lid, ad in hub.adapters.items():
        x, y, *g = seen[lid]
        metric = g[0] if g else None
        gen = torch.Generator().manual_seed(derive_seed(seed, "shuffle", lid))
        y_ctl = y[torch.randperm(y.shape[0], generator=gen)][:, torch.randperm(y.shape[1], generator=gen)]
        ad.eval()
        with torch.no_grad():
            base = ad(x, y, metric=metric)
            size = float((base - x).norm()) or float("nan")
            places = [*BLOCKS] + (["anchor"] if ad.anchor == "source" else [])
            row = {p: float((ad(x, y, metric=metric, feeds={p: y_ctl}) - base).norm()) / size for p in places}
            row["everywhere"] = float((ad(x, y, metric=metric, feeds={p: y_ctl for p in places}) - base).norm()) / size
            row["write_size"] = float((base - x).norm() / x.norm())
            row["mix"] = [round(float(v), 3) for v in ad.layers[0].combination_weights()]
        ablation[lid] = row
    last = trace[-1]
    links = sorted(hub.adapters)
    return {"test_acc": final.get("target/test_acc"), "links": {
        lid: {"source_cos_first": first_cos.get(lid), "source_cos_last": last.get(f"transfer/{lid}/source_cos"),
              "write_change_last": last.get(f"transfer/{lid}/write_change"),
              "gate_last": last.get(f"transfer/{lid}/gate"),
              "depart_last": float(hub.adapters[lid].depart) if hub.adapters[lid].anchor == "source" else None,
              "ablation": ablation[lid]} for lid in links}}


def reference_arms(cfg: dict) -> dict:
    """alone and transplant on the same seed: the accuracies the traces are read against."""
    from mergenet_core.config.checks import parse_config
    from mergenet_core.training.loop import PairState
    from mergenet_core.training.step import take_step

    out = {}
    for name, method in (("alone", {"name": "alone", "options": {}}),
                         ("transplant", {"name": "transplant", "options": {"layers": "all"}})):
        d = copy.deepcopy(cfg)
        d["method"] = method
        if name == "alone":
            d.pop("source")
        pair = PairState.build(parse_config(d))
        spe = pair.steps_per_epoch
        for step in range(pair.cfg.target.recipe.epochs * spe):
            take_step(pair, step)
        out[name] = pair.evaluate().get("target/test_acc")
    return out


def render(rec: dict) -> str:
    m = rec["machine"]
    lines = [f"*Written by `python benchmarks/transfer_probe.py --seed {rec['seed']}`; commit {m.get('git', '?')}, "
             f"{m.get('cpu', '?')}, load {rec['load_start'][0]:.2f} at the start; {rec['wall_s'] / 60:.1f} min. "
             "One seed: traces, not verdicts (those are in docs/RESULTS.md, setting (a)).*", "",
             "Setting (a): the same small CNN as donor (trained on 20,000 Fashion-MNIST images) and target "
             "(from scratch on 1,000), 12 epochs, frozen trained source, exact signal.", "",
             "**1. Where a perfect pass-through writes** (donor vs the target at its initialisation):", ""]
    lines += bu.table(["layer", "matrix", "svd r4: cos(written, donor W)", "svd r4: cos(written top-4 part, donor's)",
                       "donor's top-4 energy share", "full: cos(written, donor W)"],
                      [[f"`{r['layer']}`", "×".join(map(str, r["shape"])), f"{r['svd_cos_donor']:+.3f}",
                        f"{r['svd_cos_donor_top4']:+.3f}", f"{r['donor_top4_energy']:.2f}", "+1.000"]
                       for r in rec["passthrough"]])
    ref = rec["reference"]
    lines += ["", f"**2. Training traces** (same seed: `alone` {100 * ref['alone']:.1f} %, `transplant` "
                  f"{100 * ref['transplant']:.1f} % test accuracy):", ""]
    rows = []
    for arm, r in rec["arms"].items():
        for lid, l in r["links"].items():
            fmt = (lambda v, f="+.3f": "–" if v is None else format(v, f))
            rows.append([arm if lid == "0" else "", lid, fmt(l["source_cos_first"]), fmt(l["source_cos_last"]),
                         fmt(l["write_change_last"], ".3f"), fmt(l["gate_last"]), fmt(l["depart_last"]),
                         f"{100 * r['test_acc']:.1f} %" if lid == "0" else ""])
    lines += bu.table(["arm", "link (conv)", "cos(written, source) first", "… last epoch", "write change last epoch",
                       "gate", "departure d", "test acc"], rows)
    lines += ["", "**3. Which place carries source information** (trained adapter, last inputs; change of the "
                  "written matrix when the shuffled control's source is fed to one place only, relative to the "
                  "size of the write |X′ − X|; *rr* = target rows × source rows, *rc* = rows × columns, *cr* = "
                  "columns × rows, *cc* = columns × columns):", ""]
    rows = []
    for arm, r in rec["arms"].items():
        for lid, l in r["links"].items():
            a = l["ablation"]
            rows.append([arm if lid == "0" else "", lid, *(f"{a[p]:.3f}" if p in a else "–"
                                                          for p in ("rr", "rc", "cr", "cc", "anchor", "everywhere")),
                         f"{a['write_size']:.3f}", str(a["mix"])])
    lines += bu.table(["arm", "link", "rr", "rc", "cr", "cc", "anchor", "everywhere", "|X′ − X| / |X|",
                       "mix weights (rr, rc, cr, cc)"], rows)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=300)
    ap.add_argument("--out", default=str(bu.ROOT / "docs" / "METHOD.md"))
    ap.add_argument("--json", default=str(bu.ROOT / "benchmarks" / "results" / "transfer_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    rec = {"seed": args.seed, "machine": bu.machine_record(), "load_start": bu.loadavg()}
    cfg, _ = study_configs(args.seed)
    rec["passthrough"] = passthrough_check(cfg)
    print(json.dumps(rec["passthrough"], indent=1), flush=True)
    rec["reference"] = reference_arms(cfg)
    print(rec["reference"], flush=True)
    rec["arms"] = {}
    for arm, opts in ARMS.items():
        rec["arms"][arm] = train_arm(cfg, opts, args.seed)
        print(arm, json.dumps(rec["arms"][arm]), flush=True)
    rec["wall_s"] = time.perf_counter() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rec, indent=1, default=str))
    from orchestrator.tracking.publish import write_section

    write_section(args.out, "Why MergeNet's writes lose where a transplant gains", render(rec))
    print(render(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
