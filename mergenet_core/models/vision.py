"""Bring-your-own image models: any torchvision classification builder (``torchvision``) or timm
model (``timm``), built for the task's classes, optionally started from a local weights file.

Nothing is downloaded: torchvision's ``weights=`` and timm's ``pretrained=True`` are refused;
ImageNet (or any) weights come as a local file (``weights`` / ``checkpoint``: a ``torch.save``
state_dict, or ``.safetensors``), read with ``torch.load(weights_only=True)``. A tensor of the
file whose shape differs from the model's (typically the 1000-class ImageNet classifier on a
10-class task) is left at its fresh initialisation, and its name is recorded in the built
model's ``skipped_weights``; a name in the file the model lacks, or a model tensor the file
lacks, is a :class:`ConfigError` (a different architecture).

Names are the library's own, e.g. torchvision ``resnet18``: ``conv1.weight``,
``layer4.1.conv2.weight``, ``fc.weight``; ``mobilenet_v2``: ``features.18.0.weight``,
``classifier.1.weight``. ``classifier_name`` is set to the model's last ``nn.Linear``.

Both entries build on the meta device (:func:`~.base.build_model_shapes`); a builder that
computes its widths with tensors (torchvision's RegNets) is built on the CPU with initialisers
skipped and moved to ``meta``.
"""
from __future__ import annotations

import contextlib
import difflib
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.base import TaskInfo
from ..errors import ConfigError, short
from .base import _INITS, MODELS, _skip_init, initialisers

VISION_HINT = "pip install 'mergenet[vision]'"
#: the stand-in ``torchvision`` op library (see :func:`import_torchvision`); kept referenced, as
#: dropping a ``torch.library.Library`` removes its definitions
_TORCHVISION_OPS: torch.library.Library | None = None
#: ``torch.nn.init`` as imported (before any :func:`~.base.weightless` patched it)
_PRISTINE_INIT = {n: getattr(nn.init, n) for n in _INITS
                  if hasattr(nn.init, n) and getattr(nn.init, n) is not _skip_init}


def _missing(library: str, e: ImportError) -> ConfigError:
    """A model library that is not installed, or fails to import, with the install hint."""
    what = "is not installed" if getattr(e, "name", None) == library else f"cannot be imported ({short(e)})"
    return ConfigError("model.name", f"{library} {what}: {VISION_HINT}")


def import_torchvision(required: bool = True):
    """``import torchvision``, working around a torchvision wheel whose C extension cannot load.

    The PyPI torchvision wheel's compiled ops are built against the CUDA torch wheel; beside the
    CPU torch build its extension does not load, and ``import torchvision`` then fails with
    ``RuntimeError: operator torchvision::nms does not exist`` (its ``_meta_registrations``
    registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking
    that the ops exist; every other registration is conditional). When, and only when, that
    error occurs, the partly imported ``torchvision*`` modules are dropped, the two schemas are
    defined in a ``torchvision`` op library (kept referenced here) and the import is retried.
    Detection ops (``nms`` ...) then raise if called; classification models work.

    Transformers imports torchvision where it is installed, so a transformers model import
    needs this first too. A missing torchvision is a :class:`ConfigError` with the install
    hint, or ``None`` with ``required=False``.
    """
    global _TORCHVISION_OPS
    try:
        import torchvision
    except ImportError as e:
        if not required and getattr(e, "name", None) == "torchvision":
            return None
        raise _missing("torchvision", e) from None
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e) or _TORCHVISION_OPS is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS = lib
        import torchvision
    return torchvision


@contextlib.contextmanager
def library_imports():
    """Import a model library (torchvision, timm, transformers) as outside
    :func:`~.base.weightless`: real ``torch.nn.init`` functions and CPU tensors. Libraries that
    keep references to the initialisers at import (transformers' ``initialization``) or create
    tensors at import would otherwise keep the no-op initialiser or meta tensors for good."""
    with initialisers(_PRISTINE_INIT, "cpu"):
        yield


class TorchvisionOptions(BaseModel):
    """``name``: a classification builder of ``torchvision.models`` (``resnet18``,
    ``mobilenet_v2``, ``vit_b_16``, ...); ``weights``: a local state_dict file to start from
    (shape-mismatched tensors keep their fresh init); ``pretrained: false`` ignores ``weights``
    (an untrained control role sets it); ``kwargs``: more builder arguments (``{width_mult:
    0.35}``; ViTs default ``image_size`` to the task's)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    weights: str | None = None
    pretrained: bool = True
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TimmOptions(BaseModel):
    """``name``: a ``timm`` model (``resnet18``, ``vit_tiny_patch16_224``, ...); ``checkpoint``:
    a local state_dict file to start from (shape-mismatched tensors keep their fresh init);
    ``pretrained: false`` ignores ``checkpoint``; ``kwargs``: more ``timm.create_model``
    arguments (fixed-input-size models such as ViTs default ``img_size`` to the task's)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    checkpoint: str | None = None
    pretrained: bool = True
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _unknown(kind: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5) or known[:4]
    return ConfigError("model.options.name", f"unknown {kind} model '{short(name)}' (e.g. {', '.join(close)}; "
                                             f"{len(known)} known)")


def _kwargs(opts_kwargs: dict, reserved: dict[str, str]) -> dict:
    for key, why in reserved.items():
        if key in opts_kwargs:
            raise ConfigError(f"model.options.kwargs.{key}", why)
    return dict(opts_kwargs)


def _construct(build: Callable[[], nn.Module], what: str) -> nn.Module:
    """``build()``, its argument errors as :class:`ConfigError` on ``kwargs``; on the meta device a
    builder that needs real tensor values is built on the CPU (initialisers still skipped by
    :func:`~.base.weightless`) and moved to ``meta``."""
    try:
        try:
            return build()
        except NotImplementedError:
            if torch.get_default_device().type != "meta":
                raise
            with torch.device("cpu"):
                return build().to("meta")
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError("model.options.kwargs", f"{what}: {type(e).__name__}: {short(str(e), 160)}") from None


def _read_state(path: str, field: str, shapes_only: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """``(file, state_dict)`` of a weights file: ``torch.save`` format (a bare state_dict, or one
    under ``state_dict`` / ``model`` / ``model_state_dict``; a ``module.`` prefix is dropped) or
    ``.safetensors``. ``shapes_only``: tensors memory-mapped or on ``meta`` (nothing read)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, f"{p}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = _load_file(p, shapes_only)
    except Exception as e:  # noqa: BLE001 - corrupt / not a weights file / refused by weights_only
        raise ConfigError(field, f"{p}: not a readable weights file "
                                 f"({type(e).__name__}: {short(str(e), 120)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(field, f"{p}: not a state_dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return str(p), obj


def _load_file(p: Path, shapes_only: bool):
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not shapes_only:
            return load_file(str(p))
        with safe_open(str(p), "pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    if shapes_only:
        try:
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not the zip format: read it whole
            pass
    return torch.load(str(p), map_location="cpu", weights_only=True)


def apply_weights(model: nn.Module, path: str, field: str, load: bool = True) -> list[str]:
    """Load the weights file ``path`` into ``model`` (``load=False``: check names and shapes only)
    and return the names left at their fresh initialisation because their shapes differ (in the
    model's order)."""
    where, state = _read_state(path, field, shapes_only=not load)
    own = model.state_dict()
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(field, f"{where}: {len(extra)} tensor(s) of the file are not in the model, e.g. "
                                 f"'{short(extra[0])}' (weights of a different architecture?)")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(field, f"{where}: {len(missing)} tensor(s) of the model are missing from the file, e.g. "
                                 f"'{short(missing[0])}' (weights of a different architecture?)")
    skipped = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if len(skipped) == len(state):
        raise ConfigError(field, f"{where}: no tensor of the file has the model's shape")
    if load:
        model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def _finish(model: nn.Module, weights: str | None, field: str, load: bool) -> nn.Module:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.classifier_name = linears[-1] if linears else None
    model.skipped_weights = apply_weights(model, weights, field, load) if weights else []
    return model


def _torchvision_model(opts: TorchvisionOptions, info: TaskInfo, load: bool) -> nn.Module:
    with library_imports():
        tv = import_torchvision()
    known = tv.models.list_models(module=tv.models)
    if opts.name not in known:
        raise _unknown("torchvision classification", opts.name, known)
    if info.in_channels not in (0, 3):
        raise ConfigError("model.name", f"torchvision '{opts.name}' takes 3-channel images but task '{info.name}' "
                                        f"has {info.in_channels} channel(s): give the task the option channels: 3")
    kwargs = _kwargs(opts.kwargs, {"num_classes": "set by the task's classes",
                                   "weights": "nothing is downloaded: give a local file as options.weights"})
    if opts.name.startswith("vit_") and info.image_size:
        kwargs.setdefault("image_size", info.image_size)
    if opts.name in ("inception_v3", "googlenet"):
        kwargs.setdefault("aux_logits", False)  # a plain logits tensor in training too
        kwargs.setdefault("init_weights", True)
    model = _construct(lambda: tv.models.get_model(opts.name, num_classes=info.num_classes, **kwargs),
                       f"torchvision '{opts.name}'")
    return _finish(model, opts.weights if opts.pretrained else None, "model.options.weights", load)


def _torchvision_norm(opts: TorchvisionOptions) -> dict:
    """The model's own preprocessing where it starts from a weights file: the normalisation of
    torchvision's released weights for that builder (what such a file was trained with), as the
    image task's default ``mean``/``std``; nothing for a model trained from scratch."""
    if not (opts.weights and opts.pretrained):
        return {}
    with library_imports():
        tv = import_torchvision()
    try:
        t = tv.models.get_model_weights(opts.name).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return {}
    return {"mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std]}


@MODELS.register("torchvision", TorchvisionOptions, modality="image", task_defaults=_torchvision_norm,
                 shapes=lambda opts, info: _torchvision_model(opts, info, load=False))
def torchvision_model(opts: TorchvisionOptions, info: TaskInfo) -> nn.Module:
    return _torchvision_model(opts, info, load=True)


def import_timm():
    """``import timm`` (after :func:`import_torchvision`, which timm imports); a missing timm is
    a :class:`ConfigError` with the install hint."""
    import_torchvision(required=False)
    try:
        import timm
    except ImportError as e:
        raise _missing("timm", e) from None
    return timm


def _timm_model(opts: TimmOptions, info: TaskInfo, load: bool) -> nn.Module:
    with library_imports():
        timm = import_timm()
    if not timm.is_model(opts.name):
        raise _unknown("timm", opts.name, timm.list_models())
    kwargs = _kwargs(opts.kwargs, {"num_classes": "set by the task's classes",
                                   "in_chans": "set by the task's channels",
                                   "pretrained": "nothing is downloaded: give a local file as options.checkpoint"})
    cfg = timm.models.get_pretrained_cfg(opts.name)
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and info.image_size:
        kwargs.setdefault("img_size", info.image_size)
    model = _construct(lambda: timm.create_model(opts.name, pretrained=False, num_classes=info.num_classes,
                                                 in_chans=info.in_channels or 3, **kwargs), f"timm '{opts.name}'")
    return _finish(model, opts.checkpoint if opts.pretrained else None, "model.options.checkpoint", load)


def _timm_norm(opts: TimmOptions) -> dict:
    """The model's own preprocessing where it starts from a checkpoint: its pretrained config's
    ``mean``/``std`` as the image task's default normalisation."""
    if not (opts.checkpoint and opts.pretrained):
        return {}
    with library_imports():
        cfg = import_timm().models.get_pretrained_cfg(opts.name)
    if cfg is None or not getattr(cfg, "mean", None):
        return {}
    return {"mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std]}


@MODELS.register("timm", TimmOptions, modality="image", task_defaults=_timm_norm,
                 shapes=lambda opts, info: _timm_model(opts, info, load=False))
def timm_model(opts: TimmOptions, info: TaskInfo) -> nn.Module:
    return _timm_model(opts, info, load=True)
