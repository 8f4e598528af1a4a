"""Population-based training on any topology, written once.

A PBT trial trains ``perturbation_interval`` epochs per segment and reports each segment's last
record (carrying the segment's epoch records for MLflow) with its whole pair bundle (models, optimisers, method state, RNG, history) as the Tune
checkpoint, so an exploit copies the whole pair. A restored trial or an exploit starts from the
Tune checkpoint (a donor's bundle); otherwise from the topology's own resume point.
"""
from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path

from mergenet_core.io.outputs import RunOutputs
from mergenet_core.training.loop import load_bundle, numeric
from orchestrator.tracking.channel import EPOCHS

from .base import RunRequest, Topology


def tune_start(topo: Topology, store, work: Path):
    """``(start, epoch)`` from Tune's checkpoint: copied to ``work``, or -- for a topology that
    reads bucket checkpoints in place, with bucket storage -- used where Tune persisted it;
    ``(None, None)`` without one."""
    from ray import tune
    from ray.train import Checkpoint

    ck = tune.get_checkpoint()
    if ck is None:
        return None, None
    if topo.start_in_place and store.local is None:  # already in the bucket (Tune persisted it there)
        with ck.as_directory() as d:
            return Checkpoint(path=ck.path, filesystem=ck.filesystem), load_bundle(Path(d) / topo.bundle)["epoch"]
    start = work / f"start-{uuid.uuid4().hex[:6]}"
    with ck.as_directory() as d:
        shutil.copytree(d, start)
    return start, load_bundle(start / topo.bundle)["epoch"]


def run_pbt(topo: Topology, cfg, *, store, work: Path, out: Path, interval: int, keep_bundles: str,
            plan=None) -> dict:
    """Train ``cfg`` segment by segment; returns the summary of the epochs so far."""
    from ray import tune

    start, epoch = tune_start(topo, store, work)
    if start is None:
        epoch = topo.resume_point(out)
    final: dict = {}
    while epoch < cfg.target.recipe.epochs:
        until = min(cfg.target.recipe.epochs, epoch + interval)
        final = topo.run(cfg, RunRequest(out, store, start=start, until_epoch=until, segment=True,
                                         keep_bundles=topo.segment_keep(keep_bundles),
                                         plan=plan))
        folder = work / f"bundle-{until:04d}"
        folder.mkdir(exist_ok=True)
        start = topo.take_bundle(out, folder, store)
        epochs = [numeric(r) for r in load_bundle(folder / topo.bundle)["history"] if epoch < r["epoch"] <= until]
        # the segment's last epoch, with its epochs for MLflow (orchestrator/tracking/channel.py)
        tune.report({**epochs[-1], EPOCHS: epochs}, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        epoch = until
    if not final and start is not None:  # started from a donor already at the last epoch
        with (start.as_directory() if hasattr(start, "as_directory") else contextlib.nullcontext(start)) as d:
            final = RunOutputs(out).from_bundle(cfg, load_bundle(Path(d) / topo.bundle))
    return final
