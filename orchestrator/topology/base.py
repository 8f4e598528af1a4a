"""The topology contract: what the grid's trial driver and PBT need from a way of hosting a pair.

A topology says what a trial asks Ray for (:meth:`Topology.resources`), runs a pair from a start
point until an epoch while reporting each epoch (:meth:`Topology.run`), and handles its pair
bundles (drop them, hand one to PBT, find its own resume point). The trial driver
(:mod:`orchestrator.grid.trial`) and PBT (:mod:`.pbt`) know nothing else about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mergenet_core.registry import Registry

if TYPE_CHECKING:
    from orchestrator.config import PairConfig
    from orchestrator.cluster.storage import Location

TOPOLOGIES = Registry("topology")


@dataclass
class RunRequest:
    """One run of a pair. ``out``: the local folder for its outputs (:mod:`mergenet_core.io`);
    ``store``: the trial's folder in grid storage (local or a bucket; ``None`` for a run of its
    own), where bundles are mirrored or Train runs live; ``start``: a pair bundle to start from
    (a folder, or a checkpoint in storage: a PBT donor or the previous segment); ``segment``: a
    PBT segment (runs until ``until_epoch`` from ``start``, not resumed from its own bundle);
    ``report``: each epoch's record goes to Tune (a grid trial; the one channel its MLflow
    logging, progress lines and schedulers read: :mod:`orchestrator.tracking.channel`);
    ``plan``: what :meth:`Topology.plan` made of the config when the trial was resolved (``None``:
    the topology plans here)."""

    out: Path
    store: Location | None = None
    start: Any = None
    until_epoch: int | None = None
    keep_bundles: str = "last_and_best"
    report: bool = False
    segment: bool = False
    plan: Any = None


class Topology:
    """A way of hosting one pair. Subclass, set the class attributes, register with
    ``TOPOLOGIES.register("name")``; a module in :mod:`orchestrator.topology` is found by itself."""

    name: ClassVar[str]
    #: the pair bundle's file name inside a bundle folder (a Tune checkpoint of PBT)
    bundle: ClassVar[str]
    #: ``ray.topology: auto`` picks the highest-priority topology that claims the pair
    priority: ClassVar[int] = 0
    #: PBT: a bucket-stored Tune checkpoint can be read in place by this topology's workers
    start_in_place: ClassVar[bool] = False

    def auto(self, cfg: PairConfig) -> bool:
        """Whether ``auto`` may pick this topology for ``cfg``."""
        return False

    def plan(self, cfg: PairConfig) -> Any:
        """What the topology derives from ``cfg`` before it runs, made once when a grid's trial is
        resolved (:mod:`orchestrator.grid.spec`) and handed back in :attr:`RunRequest.plan`; picklable."""
        return None

    def resources(self, cfg: PairConfig, driver_cpus: float) -> list[dict]:
        """The placement-group bundles of a trial running ``cfg`` (its first bundle is the trial
        process; ``driver_cpus``: the grid's ``resources.trial_driver_cpus``)."""
        raise NotImplementedError

    def check(self, cfg: PairConfig, roles) -> None:
        """Raise :class:`~mergenet_core.errors.ConfigError` if this topology cannot host ``cfg``'s
        ``ray`` layout for the method's :class:`~mergenet_core.methods.base.Roles` (validation, before
        any Ray work)."""

    def run(self, cfg: PairConfig, req: RunRequest) -> dict:
        """Train (or resume) the pair; write its outputs to ``req.out``; return the summary."""
        raise NotImplementedError

    def drop_bundles(self, out: Path, store: Location) -> None:
        """``keep_bundles: none``: delete a finished run's pair bundles (the caller records that
        none is kept)."""
        raise NotImplementedError

    def segment_keep(self, grid_keep: str) -> str:
        """Which bundles a PBT segment keeps (``grid_keep``: the grid's ``bundles_while_running``)."""
        return grid_keep

    def resume_point(self, out: Path) -> int:
        """PBT without a Tune checkpoint: the epoch this trial's own outputs let it resume from."""
        return 0

    def take_bundle(self, out: Path, folder: Path, store: Location) -> Any:
        """PBT: put the segment's pair bundle into ``folder`` (the segment's Tune checkpoint) and
        return where the next segment starts (``None``: from the topology's own resume point)."""
        raise NotImplementedError
