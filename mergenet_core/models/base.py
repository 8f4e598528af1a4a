"""The model registry and the functions that build a registered model (with or without weights)."""
from __future__ import annotations

import contextlib

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from ..data.base import TaskInfo
from ..data.modality import MODALITIES, mismatch
from ..errors import ConfigError
from ..registry import Registry



def _check_entry(entry) -> None:
    """A model entry declares the input it takes (``modality=``, a registered modality)."""
    if entry.meta.get("modality") not in MODALITIES:
        raise ValueError(f"model '{entry.name}': modality= must be one of {MODALITIES.names()}, "
                         f"not {entry.meta.get('modality')!r}")
    if not callable(entry.fn):
        raise ValueError(f"model '{entry.name}': {entry.fn!r} is not a builder (options, info) -> nn.Module")


MODELS = Registry("model", check=_check_entry)


def build_model(name: str, options: dict | BaseModel | None, info: TaskInfo) -> nn.Module:
    """Validate ``options`` for model ``name``, check modality against ``info``, build it."""
    entry, opts = _checked(name, options, info)
    return entry.fn(opts, info)


def build_model_shapes(name: str, options: dict | BaseModel | None, info: TaskInfo) -> nn.Module:
    """The same model as :func:`build_model` (same names, shapes, module types and order, same
    option errors) but without weights: every tensor lives on the ``meta`` device, no
    initialiser runs and no pretrained weights are read (an entry may register a cheaper
    ``shapes`` builder, e.g. MiniLM without importing transformers). For fast validation."""
    entry, opts = _checked(name, options, info)
    with weightless():
        return entry.meta.get("shapes", entry.fn)(opts, info)


_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
          "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def weightless():
    """Build modules on the ``meta`` device with ``torch.nn.init`` skipped (the values of meta
    tensors do not exist anyway, and several initialisers would load torch's Python meta
    kernels, about a second of imports)."""
    with initialisers({n: _skip_init for n in _INITS if hasattr(nn.init, n)}, "meta"):
        yield


@contextlib.contextmanager
def initialisers(functions: dict, device: str):
    """``torch.nn.init``'s functions of these names replaced, and ``device`` the default device,
    within the block; put back as they were after it (:func:`weightless`,
    ``models.vision.library_imports``)."""
    saved = {n: getattr(nn.init, n) for n in functions}
    try:
        for n, f in functions.items():
            setattr(nn.init, n, f)
        with torch.device(device):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _skip_init(tensor, *args, **kwargs):
    return tensor


def _checked(name: str, options: dict | BaseModel | None, info: TaskInfo):
    entry = MODELS.get(name, "model.name")
    try:
        opts = MODELS.options(name, options)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"model.options.{loc}" if loc else "model.options", err["msg"]) from None
    problem = mismatch(name, entry.meta.get("modality"), info.name, info.modality)
    if problem:
        raise ConfigError("model.name", problem)
    return entry, opts
