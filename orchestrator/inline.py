"""Topology ``inline``: the whole pair's training loop inside the calling process.

A Tune trial whose pair fits one device needs no Ray Train worker group: starting one costs
~40-60 s per trial on a small machine, against seconds of training. :func:`run_pair_inline`
runs the single-process :class:`~mergenet_core.engine.Engine` (the same loop, checkpoints,
``metrics.jsonl`` and ``final.json`` as ``mergenet train``) in the trial process, so its
metrics equal the engine's exactly. ``choose_topology`` says which pairs may.

Resume: the engine resumes from ``checkpoint.pt`` in the output folder; with bucket storage
(``remote``) every bundle written is also uploaded, and a restarted trial on another node
downloads it first. PBT segments start from a donor's bundle (``start_from``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from orchestrator.config import PairConfig
from mergenet_core.engine import Engine
from mergenet_core.loop import BEST, CHECKPOINT
from orchestrator.storage import Location

def choose_topology(cfg: PairConfig) -> str:
    """``ray.topology``, with ``auto`` resolved: the Ray Train role workers (``split``) when the
    pair asks for a GPU per role, several workers per role, spread placement or custom worker
    resources; otherwise ``inline``."""
    rs = cfg.ray
    if rs.topology != "auto":
        return rs.topology
    if (rs.use_gpu or rs.source_workers > 1 or rs.target_workers > 1 or rs.worker_resources
            or rs.placement in ("SPREAD", "STRICT_SPREAD")):
        return "split"
    return "inline"


def placement_record(device: str = "cpu") -> list[dict]:
    """``placement.json`` of an inline pair: one process hosting both roles."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return [{"role": "pair", "role_rank": 0, "world_rank": 0, "pid": os.getpid(), "node_id": node,
             "device": device}]


def run_pair_inline(cfg: PairConfig, out: Path, *, on_epoch: Callable[[dict], None] | None = None,
                    remote: Location | None = None, keep_bundles: str = "last_and_best",
                    start_from: Path | None = None, until_epoch: int | None = None,
                    on_saved: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) the pair in this process; returns the engine's summary.

    ``on_epoch(record)``: each epoch's record (Tune report, MLflow). ``on_saved(record)``: called
    once that epoch's bundle is on disk (and mirrored): what is logged there is never logged twice
    when an interrupted trial resumes from its last bundle. ``remote``: a bucket
    folder mirroring the bundles (``checkpoint.pt``, ``best.pt``). ``start_from``: a folder
    holding a ``checkpoint.pt`` to start from (a PBT donor). ``until_epoch``: stop there.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if start_from is not None:
        shutil.copy2(Path(start_from) / CHECKPOINT, out / CHECKPOINT)
    elif remote is not None and not (out / CHECKPOINT).exists() and (remote / CHECKPOINT).exists():
        for name in (CHECKPOINT, BEST):  # a restarted trial on another node
            if (remote / name).exists():
                (out / name).write_bytes((remote / name).read_bytes())

    def mirror(path: Path, record: dict) -> None:
        names = [n for n in (CHECKPOINT, BEST) if (out / n).exists()]
        if keep_bundles == "all":  # every bundle written, like the split topology's checkpoints
            kept = f"bundle-{int(record['epoch']):04d}.pt"
            shutil.copy2(out / CHECKPOINT, out / kept)
            names.append(kept)
        if remote is not None:
            remote.upload(out, names)
        if on_saved is not None:
            on_saved(record)

    engine = Engine(cfg, out, progress=False, on_epoch=on_epoch, on_checkpoint=mirror,
                    keep_bundles=keep_bundles)
    final = engine.run(resume=True, until_epoch=until_epoch)
    (out / "placement.json").write_text(json.dumps(placement_record(str(engine.device)), indent=2))
    where = (lambda n: str(remote / n)) if remote is not None else (lambda n: str(out / n))
    kept = {"last": {"epoch": engine.pair.epoch, "path": where(CHECKPOINT)}}
    if (out / BEST).exists() and "target/best_val_epoch" in final:
        kept["best_val"] = {"epoch": int(final["target/best_val_epoch"]), "path": where(BEST)}
    (out / "bundles.json").write_text(json.dumps(kept, indent=2))
    return final
