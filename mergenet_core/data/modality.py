"""Modalities: the kinds of input a task gives and a model takes (``image``, ``text``).

A model declares its modality once, as ``modality=`` on its ``MODELS`` entry, and a task as
``modality=`` on its ``TASKS`` entry and in its :class:`TaskInfo`. Everything that depends on
the kind of input asks the registered :class:`Modality`: a role's batch preparation
(:class:`mergenet_core.training.roles.Role`), the stand-in task of ``mergenet pairs``, and the one
model/task check (:func:`mismatch`). A new modality is one subclass registered here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry
from .augment import prepare_images
from .base import TaskInfo

MODALITIES = Registry("modality")


class Modality:
    """How one kind of input reaches a model. Subclasses set ``name`` and ``title`` and
    implement :meth:`example_info` and :meth:`prepare`."""

    name: str = ""
    title: str = ""  # plain description of the input

    def example_info(self, num_classes: int) -> TaskInfo:
        """A stand-in task of this modality, to build a model without data (``mergenet pairs``)."""
        raise NotImplementedError

    def prepare(self, x, info: TaskInfo, device: torch.device, train: bool,
                generator: torch.Generator | None = None, channels_last: bool = False):
        """A batch's inputs ``x`` (as the task's splits hold them) moved to ``device`` and made
        what the model takes; ``train`` applies the training-time augmentation, drawn from
        ``generator``."""
        raise NotImplementedError

    def prepare_model(self, model: nn.Module, channels_last: bool) -> None:
        """Set the model's memory layout for this input (the model is on its device already)."""


def register(cls: type[Modality]) -> type[Modality]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    MODALITIES.register(cls.name)(cls())
    return cls


def get_modality(name: str, field: str = "modality") -> Modality:
    return MODALITIES.get(name, field).fn


def mismatch(model: str, takes: str | None, task: str, gives: str | None) -> str | None:
    """The problem of putting model ``model`` (taking ``takes`` input) on task ``task``
    (giving ``gives``), or None when the modalities agree."""
    if takes == gives:
        return None
    return f"model '{model}' takes {takes} input but task '{task}' is {gives}"


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


@register
class Image(Modality):
    """uint8 ``[N, C, H, W]``, normalised (and augmented when training) on the device."""

    name = "image"
    title = "images (uint8 [N, C, H, W], normalised per batch)"

    def example_info(self, num_classes: int) -> TaskInfo:
        return TaskInfo(name="image", modality="image", num_classes=num_classes, in_channels=3, image_size=32)

    def prepare(self, x, info, device, train, generator=None, channels_last=False):
        x = prepare_images(_to(x, device), info, train=train, generator=generator)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def prepare_model(self, model, channels_last):
        if channels_last:
            model.to(memory_format=torch.channels_last)


@register
class Text(Modality):
    """``{"input_ids", "attention_mask"}`` int64 ``[N, L]``, moved to the device as they are."""

    name = "text"
    title = "text (token ids and attention mask, int64 [N, L])"

    def example_info(self, num_classes: int) -> TaskInfo:
        return TaskInfo(name="text", modality="text", num_classes=num_classes, max_length=64, vocab_size=30522)

    def prepare(self, x, info, device, train, generator=None, channels_last=False):
        return {k: _to(v, device) for k, v in x.items()}
