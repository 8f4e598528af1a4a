"""Topology ``inline``: the whole pair's training loop inside the calling process.

A Tune trial whose pair fits one device needs no Ray Train worker group: starting one costs
~40-60 s per trial on a small machine, against seconds of training. This topology runs the
single-process :class:`~mergenet_core.training.engine.Engine` (the same loop, checkpoints,
``metrics.jsonl`` and ``final.json`` as ``mergenet train``) in the trial process, so its
metrics equal the engine's exactly. ``auto`` falls back to it.

Resume: the engine resumes from ``checkpoint.pt`` in the output folder; with bucket storage
every bundle written is also uploaded (``<trial>/inline``), and a restarted trial on another
node downloads it first. PBT segments start from a donor's bundle.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mergenet_core.errors import ConfigError
from mergenet_core.io.outputs import RunOutputs
from mergenet_core.training.loop import BEST, CHECKPOINT, load_bundle, numeric

from .base import TOPOLOGIES, RunRequest, Topology

if TYPE_CHECKING:
    from orchestrator.config import PairConfig
    from orchestrator.cluster.storage import Location


@TOPOLOGIES.register("inline")
class Inline(Topology):
    name = "inline"
    bundle = CHECKPOINT
    priority = -100  # the fallback: whatever no other topology claims

    def auto(self, cfg: PairConfig) -> bool:
        return True

    def check(self, cfg: PairConfig, roles) -> None:
        if cfg.ray.source_workers > 1 or cfg.ray.target_workers > 1:
            raise ConfigError("ray.target_workers", "the inline topology hosts the whole pair in one process; "
                                                    "set source_workers and target_workers to 1, or topology split")

    def resources(self, cfg: PairConfig, driver_cpus: float) -> list[dict]:
        """The trial process trains the pair, so it holds the pair's CPUs (or its GPU)."""
        need = {"CPU": cfg.ray.cpus_per_worker}
        if cfg.ray.use_gpu:  # ray.gpus_per_worker < 1: several inline trials share one GPU
            need["GPU"] = cfg.ray.worker_gpus
        return [need]

    def run(self, cfg: PairConfig, req: RunRequest) -> dict:
        on_epoch = on_saved = None
        if req.report:
            on_epoch, on_saved = _reporting()
        remote = None if req.segment or req.store is None or req.store.local is not None else req.store / "inline"
        final = run_pair_inline(cfg, req.out, on_epoch=on_epoch, on_saved=on_saved, remote=remote,
                                keep_bundles=req.keep_bundles, start_from=req.start, until_epoch=req.until_epoch)
        if on_saved is not None:
            on_saved({})  # epochs after the last bundle (none: the last epoch always saves one)
        return final

    def drop_bundles(self, out: Path, store: Location) -> None:
        for name in (CHECKPOINT, BEST):
            (out / name).unlink(missing_ok=True)
        if store.local is None:
            (store / "inline").delete()

    def segment_keep(self, grid_keep: str) -> str:
        return "last"

    def resume_point(self, out: Path) -> int:
        return load_bundle(out / CHECKPOINT)["epoch"] if (out / CHECKPOINT).exists() else 0

    def take_bundle(self, out: Path, folder: Path, store: Location):
        shutil.copy2(out / CHECKPOINT, folder / CHECKPOINT)
        return None  # the next segment resumes from its own checkpoint.pt


def _reporting() -> tuple[Callable, Callable]:
    """Each epoch to Tune once the epoch's bundle is saved: a trial killed between an epoch's end
    and its bundle resumes from the bundle before and runs that epoch again, which would
    otherwise report it twice (and log it twice to MLflow, which reads Tune's results)."""
    from ray import tune

    pending: list[dict] = []

    def on_epoch(record: dict) -> None:
        pending.append(numeric(record))

    def on_saved(record: dict) -> None:
        for numbers in pending:
            tune.report(numbers)
        pending.clear()

    return on_epoch, on_saved


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

    ``on_epoch(record)``: each epoch's record (a Tune report once saved). ``on_saved(record)``: called
    once that epoch's bundle is on disk (and mirrored): what is logged there is never logged twice
    when an interrupted trial resumes from its last bundle. ``remote``: a bucket
    folder mirroring the bundles (``checkpoint.pt``, ``best.pt``). ``start_from``: a folder
    holding a ``checkpoint.pt`` to start from (a PBT donor). ``until_epoch``: stop there.
    """
    from mergenet_core.training.engine import Engine

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
    where = (lambda n: str(remote / n)) if remote is not None else (lambda n: str(out / n))
    kept = {"last": {"epoch": engine.pair.epoch, "path": where(CHECKPOINT)}}
    if (out / BEST).exists() and "target/best_val_epoch" in final:
        kept["best_val"] = {"epoch": int(final["target/best_val_epoch"]), "path": where(BEST)}
    outputs = RunOutputs(out)
    outputs.placement(placement_record(str(engine.device)))
    outputs.bundles(kept)
    return final
