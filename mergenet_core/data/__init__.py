"""Data layer: task registry and loaders, image preparation, deterministic batch streams.

``build_task(name, options, seed)`` returns a :class:`TaskData` with train/val/test splits;
see :mod:`mergenet_core.data.base` for the batch contract.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from . import images, text  # noqa: F401  (register the tasks)
from .augment import prepare_images
from .base import TASKS, Split, TaskData, TaskInfo
from .stream import BatchStream, iter_eval


def build_task(name: str, options: dict[str, Any] | BaseModel | None, seed: int) -> TaskData:
    """Validate ``options`` against the task's options model and load the task for ``seed``.

    Raw files are read once per process (cached); splits depend only on ``seed`` and options.
    """
    entry = TASKS.get(name)
    opts = TASKS.options(name, options)
    return entry.fn(opts, int(seed))


__all__ = ["TASKS", "Split", "TaskInfo", "TaskData", "build_task", "prepare_images",
           "BatchStream", "iter_eval"]
