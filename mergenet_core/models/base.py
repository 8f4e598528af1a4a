"""The model registry and the one function that builds a registered model."""
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
