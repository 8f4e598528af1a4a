"""Model registry: image (CIFAR-style ResNet, MobileNetV2, small CNN) and text (MiniLM) models.

Every model is a plain ``nn.Module`` whose parameters are addressable by dotted name
(``dict(model.named_parameters())``), so MergeNet layer pairs are just two names. Each
model class also carries three class attributes that :mod:`.inspect` reads:
``modality``, ``classifier_name`` (the final linear) and ``last_stage_prefixes``.

Image models: ``forward(x: Tensor[N, C, H, W]) -> logits [N, K]``.
Text models: ``forward({"input_ids", "attention_mask"}) -> logits [N, K]``.
"""
from __future__ import annotations

from pydantic import BaseModel, ValidationError
from torch import nn

from ..data.base import TaskInfo
from ..errors import ConfigError
from ..registry import Registry

MODELS = Registry("model")


def build_model(name: str, options: dict | BaseModel | None, info: TaskInfo) -> nn.Module:
    """Validate ``options`` for model ``name``, check modality against ``info``, build it."""
    entry = MODELS.get(name, "model.name")
    try:
        opts = MODELS.options(name, options)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"model.options.{loc}" if loc else "model.options", err["msg"]) from None
    modality = entry.meta.get("modality")
    if modality != info.modality:
        raise ConfigError(
            "model.name",
            f"model '{name}' takes {modality} input but task '{info.name}' is {info.modality}",
        )
    return entry.fn(opts, info)


from . import cnn, mobilenetv2, resnet, text  # noqa: E402,F401  (register entries)

__all__ = ["MODELS", "build_model"]
