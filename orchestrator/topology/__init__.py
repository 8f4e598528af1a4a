"""Pair topologies: how one pair's two models are hosted (:class:`.base.Topology`).

Every module (or folder) here registers one topology under its own name (``TOPOLOGIES.register("name")(cls)``) and
is found by :func:`discover`, so a new topology is one module here and nothing else changes
(docs/ARCHITECTURE.md). ``ray.topology`` names one, or ``auto`` lets :func:`choose` pick the
highest-priority topology whose :meth:`~.base.Topology.auto` claims the pair. Importing this
package (and its modules) imports no Ray: configs validate against the registry.
"""
from __future__ import annotations

import importlib

from orchestrator.config import topology_modules

from .base import TOPOLOGIES, RunRequest, Topology

__all__ = ["TOPOLOGIES", "RunRequest", "Topology", "choose", "discover", "names"]


def discover() -> None:
    """Import every topology module of this folder not imported yet (also one added while a
    long-lived process, such as a reused Tune trial process, runs)."""
    for name in topology_modules():
        importlib.import_module(f"{__name__}.{name}")


def names() -> list[str]:
    discover()
    return TOPOLOGIES.names()


def get(name: str) -> Topology:
    discover()
    return TOPOLOGIES.get(name, field="ray.topology").fn()


def choose(cfg) -> Topology:
    """The pair's topology: ``ray.topology``, or with ``auto`` the highest-priority one that
    claims the pair."""
    if cfg.ray.topology != "auto":
        return get(cfg.ray.topology)
    discover()
    ranked = sorted((TOPOLOGIES.get(n).fn() for n in TOPOLOGIES.names()), key=lambda t: -t.priority)
    return next(t for t in ranked if t.auto(cfg))
