"""Data containers shared by every task, and the task registry.

Every task loads fully into memory as tensors (the offline sets are small). A batch is
``(x, y)``: for images ``x`` is a uint8 tensor ``[N, C, H, W]`` that
:func:`mergenet_core.data.augment.prepare_images` turns into a normalised float batch on the
batch's device; for text ``x`` is a dict ``{"input_ids", "attention_mask"}`` of int64
``[N, L]`` tensors (see :mod:`.modality`).

A ``TASKS`` entry's metadata: ``modality`` (a ``MODALITIES`` name), ``probe`` (fast
validation: options -> :class:`TaskShape`) and ``title`` (the data set's plain name in reports).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..registry import Registry


TASKS = Registry("task")  # its entry check: data/__init__.py (modality.check_task_entry)


@dataclass
class Split:
    x: torch.Tensor | dict[str, torch.Tensor]
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: torch.Tensor):
        if isinstance(self.x, dict):
            return {k: v[idx] for k, v in self.x.items()}, self.y[idx]
        return self.x[idx], self.y[idx]


@dataclass
class TaskInfo:
    """What a model needs to know about its task to be built."""

    name: str
    modality: str                 # a MODALITIES name (data/modality.py): "image", "text"
    num_classes: int
    in_channels: int = 0          # images
    image_size: int = 0           # images (square)
    max_length: int = 0           # text
    vocab_size: int = 0           # text
    mean: tuple[float, ...] = ()  # images: per-channel normalisation
    std: tuple[float, ...] = ()
    description: str = ""         # plain dataset name, e.g. "Fashion-MNIST (32x32, 3ch)"


@dataclass
class TaskShape:
    """What fast validation learns about a task without loading it: the model-facing
    :class:`TaskInfo` (``mean``/``std`` left empty) and the sizes of the three splits."""

    info: TaskInfo
    train: int
    val: int
    test: int


@dataclass
class TaskData:
    info: TaskInfo
    train: Split
    val: Split
    test: Split
    class_names: list[str] = field(default_factory=list)
