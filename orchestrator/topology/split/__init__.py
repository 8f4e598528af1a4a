"""Topology ``split``: the pair as a Ray Train worker group (role workers) plus an adapter actor.

The trial process only drives the pair's ``TorchTrainer`` (:func:`.driver.run_pair_on_ray`;
its plan in :mod:`.plan`, the Train workers in :mod:`.worker`, the adapter actor in :mod:`.actor`, hang
detection in :mod:`.watchdog`: the whole topology lives in this folder). ``auto`` picks it when a pair asks
for what one process cannot give: a GPU per role, several workers per role, spread placement or
custom worker resources. A trial's Train run lives in its folder (``<trial>/train``; PBT segments
in ``<trial>/segments/seg-NNNN``), so a restored trial resumes it.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mergenet_core.io import PAIR_BUNDLE as BUNDLE

from orchestrator.topology.base import TOPOLOGIES, RunRequest, Topology

from .plan import worker_layout

if TYPE_CHECKING:
    from orchestrator.config import PairConfig
    from orchestrator.cluster.storage import Location


@TOPOLOGIES.register("split")
class Split(Topology):
    name = "split"
    bundle = BUNDLE
    start_in_place = True  # every Train worker reads a bucket checkpoint itself

    def auto(self, cfg: PairConfig) -> bool:
        rs = cfg.ray
        return bool(rs.use_gpu or rs.source_workers > 1 or rs.target_workers > 1 or rs.worker_resources
                    or rs.placement in ("SPREAD", "STRICT_SPREAD"))

    def check(self, cfg: PairConfig, roles) -> None:
        worker_layout(cfg, roles)

    def plan(self, cfg: PairConfig):
        """The worker layout, the exchange and the steps per epoch from the weightless build (no
        data, no weights: the grid was validated before it started and the workers build the real pair)."""
        from .plan import plan_pair

        return plan_pair(cfg, deep=False)

    def resources(self, cfg: PairConfig, driver_cpus: float) -> list[dict]:
        """The trial process only drives the worker group, which Ray Train places itself."""
        return [{"CPU": driver_cpus}]

    def run(self, cfg: PairConfig, req: RunRequest) -> dict:
        from .driver import preflight, run_pair_on_ray

        # a grid's trial brings the plan its resolution made; a run of its own plans on the full build
        plan = preflight(cfg, deep=req.store is None, plan=req.plan)

        callbacks = []
        if req.report:  # each epoch's train.report on to Tune: the trial's one channel
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks.append(TuneReportCallback())
        # where the Train run lives: OUT/ray/pair for a run of its own; a trial's folder (``train``),
        # or per PBT segment ``segments/seg-NNNN``, which starts from its bundle and never resumes
        path = fs = None
        name, resume = "pair", True
        if req.store is not None:
            where, name = ((req.store / "segments", f"seg-{req.until_epoch:04d}") if req.segment
                           else (req.store, "train"))
            path, fs = where.ray_storage()
            resume = not req.segment
        return run_pair_on_ray(cfg, req.out, plan=plan, resume=resume, storage_path=path, storage_filesystem=fs,
                               name=name, callbacks=callbacks, keep_bundles=req.keep_bundles, start_from=req.start,
                               until_epoch=req.until_epoch)

    def drop_bundles(self, out: Path, store: Location) -> None:
        train = store / "train"
        for name in train.listdir():
            if name.startswith("checkpoint_"):
                (train / name).delete()

    def take_bundle(self, out: Path, folder: Path, store: Location):
        """Move the segment's bundle out of the output folder; the next segment starts from it,
        which every Train worker must be able to read: with a bucket, its uploaded copy."""
        from ray.train import Checkpoint

        shutil.move(str(out / BUNDLE), folder / BUNDLE)
        if store.local is not None:
            return folder
        remote = store / folder.name
        remote.upload(folder)
        return Checkpoint(path=remote.path, filesystem=remote.fs)
