"""The one writer of a run's output folder (``mergenet train``, an inline or split pair, a trial).

Every host -- the single-process engine, the split topology's driver, a PBT trial that
inherited a finished donor -- writes the same files through :class:`RunOutputs`, so their
names and formats cannot drift:

- ``config.json``: the validated pair config;
- ``metrics.jsonl``: one JSON line per epoch record, rewritten atomically from the history
  (it always mirrors the checkpointed history; epochs lost in a crash are dropped);
- ``final.json``: the summary (:func:`summarise`: final and best-validation figures);
- ``placement.json``: which process (role, rank, node, pid, device) hosted which role;
- ``bundles.json``: where the kept pair bundles are (``{}`` when none is kept).
"""
from __future__ import annotations

import json
from pathlib import Path

from .safe_io import write_atomic
from . import BUNDLES, CONFIG, FINAL, METRICS, PLACEMENT


def summarise(history: list[dict]) -> dict[str, float]:
    """Final-epoch and best-validation-epoch figures for every role (never best-on-test), over
    the evaluated epochs of ``history``."""
    history = [r for r in history if "target/val_acc" in r]
    if not history:
        return {}
    last = history[-1]
    out = {"epochs": last["epoch"], "steps": last["step"]}
    for role in ("source", "target"):
        if f"{role}/val_acc" not in last:
            continue
        best = max(history, key=lambda r: (r[f"{role}/val_acc"], -r["epoch"]))
        out.update({
            f"{role}/final_test_acc": last[f"{role}/test_acc"],
            f"{role}/final_val_acc": last[f"{role}/val_acc"],
            f"{role}/best_val_acc": best[f"{role}/val_acc"],
            f"{role}/best_val_epoch": best["epoch"],
            f"{role}/test_acc_at_best_val": best[f"{role}/test_acc"],
        })
    out["wall_s"] = sum(r.get("time/epoch_s", 0.0) for r in history)
    return out


class RunOutputs:
    """A run's output folder. Every write is atomic (a crash never leaves half a file)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def read_history(self) -> list[dict]:
        path = self.out / METRICS
        return [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []

    def begin(self, cfg, fresh: bool, history: list[dict] | None = None) -> None:
        """Start (``fresh``: drop a previous run's summary and history) or resume a run:
        ``config.json``, and ``metrics.jsonl`` from ``history`` when given (a resumed bundle's)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if fresh:
            for name in (FINAL, METRICS):
                (self.out / name).unlink(missing_ok=True)
        write_atomic(self.out / CONFIG, cfg.model_dump_json(indent=2))
        if history is not None:
            self.history(history)

    def history(self, history: list[dict]) -> None:
        write_atomic(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def placement(self, placement: list[dict]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out / PLACEMENT, json.dumps(placement, indent=2))

    def bundles(self, kept: dict) -> None:
        write_atomic(self.out / BUNDLES, json.dumps(kept, indent=2))

    def no_bundles(self) -> None:
        """``keep_bundles: none``: the run keeps no bundle."""
        self.bundles({})

    def finish(self, final: dict | None = None, history: list[dict] | None = None, kept: dict | None = None,
               placement: list[dict] | None = None) -> dict:
        """The run's end: ``metrics.jsonl`` (when ``history`` is given), ``final.json`` (``final``,
        else the summary of ``history``), and ``placement.json`` / ``bundles.json`` when given."""
        if history is not None:
            self.history(history)
            final = summarise(history) if final is None else final
        final = final or {}
        write_atomic(self.out / FINAL, json.dumps(final, indent=2))
        if placement is not None:
            self.placement(placement)
        if kept is not None:
            self.bundles(kept)
        return final

    def from_bundle(self, cfg, bundle: dict) -> dict:
        """Outputs of a run handed a bundle that is already at its last epoch (a PBT donor):
        nothing is left to train, and its history and summary are the bundle's."""
        self.begin(cfg, fresh=False)
        return self.finish(history=bundle["history"])
