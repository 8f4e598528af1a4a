"""Data layer: task registry and loaders, image preparation, deterministic batch streams.

``build_task(name, options, seed)`` returns a :class:`TaskData` with train/val/test splits;
see :mod:`mergenet_core.data.base` for the batch contract.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pydantic import BaseModel

from .augment import prepare_images
from .base import TASKS, Split, TaskData, TaskInfo, TaskShape
from .modality import MODALITIES, Modality, check_task_entry, get_modality
from .stream import BatchStream, iter_eval

TASKS.check = check_task_entry  # a task's modality is one of MODALITIES (base.py cannot import them)

# Every module here is imported, so a new data set is one module that registers itself in TASKS.
for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def build_task(name: str, options: dict[str, Any] | BaseModel | None, seed: int) -> TaskData:
    """Validate ``options`` against the task's options model and load the task for ``seed``.

    Raw files are read once per process (cached); splits depend only on ``seed`` and options.
    """
    entry = TASKS.get(name)
    opts = TASKS.options(name, options)
    return entry.fn(opts, int(seed))


def probe_task(name: str, options: dict[str, Any] | BaseModel | None) -> TaskShape:
    """What :func:`build_task` would give, without loading the data (fast validation): the
    task's :class:`TaskInfo` and split sizes from file presence and metadata (headers, file
    counts). Raises the errors :func:`build_task` raises for missing files / impossible splits
    (not those of corrupt contents past the headers: ``mergenet validate --deep``)."""
    entry = TASKS.get(name)
    opts = TASKS.options(name, options)
    return entry.meta["probe"](opts)


def task_title(name: str) -> str:
    """The data set's plain name (its ``TASKS`` entry's ``title``); ``name`` itself for a task
    without one or not registered."""
    return TASKS.get(name).meta.get("title", name) if name in TASKS else name


__all__ = ["TASKS", "Split", "TaskInfo", "TaskData", "TaskShape", "build_task", "probe_task", "task_title",
           "prepare_images", "MODALITIES", "Modality", "get_modality", "BatchStream", "iter_eval"]
