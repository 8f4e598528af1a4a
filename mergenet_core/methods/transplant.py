"""``transplant``: the positive control -- the target starts with the source's layers.

At set-up the target's chosen entries (``layers``) are overwritten with the same-named entries
of the source, unscaled; then the target trains exactly like ``alone`` (the source is only a
donor read at set-up: it never trains and is never evaluated). It measures what a layer's
knowledge is worth to the target at all, with no adapter or schedule in between.

What comes along (``parts``): ``block`` (default) copies everything in the state dict under a
named module -- weights, biases, normalisation layers' weight/bias and running statistics
(``running_mean``, ``running_var``, ``num_batches_tracked``). That is the natural default: a
conv weight without the statistics of the BatchNorm after it is out of scale (the BN would
normalise the source's activations with the target's statistics). ``weights`` copies only the
>= 2-D weights of conv/linear layers; biases, norms and running statistics keep the target's
own. A name that is a parameter (``layer3.0.conv2.weight``) is that entry alone, whatever
``parts`` says.

Shapes (``selection: uniform``): identical -> copy. The same number of dims and no target dim
larger than the source's -> *weight selection* (Xu et al., ICLR 2024, "Initializing Models with
Larger Ones"): along every dim the target takes source index ``floor(i * n_src / n_tgt)`` for
``i < n_tgt`` (ratio k: every k-th element from 0). The rule depends only on the two sizes, so a
block's biases, BN parameters and running statistics are selected along their channel dim
exactly as its weight's output channels are. Anything else is incompatible: ``layers: all``
skips it (``transplant/entries_skipped``), a named layer is a ``ConfigError``.

``freeze``: the transplanted *parameters* get ``requires_grad=False`` before the optimiser is
built (a BatchNorm's running statistics are buffers and keep their ordinary training-mode
update). ``control: untrained_source``: the same copy from the source at its seed's
initialisation (``source.init_from`` not loaded).

:func:`plan_transplant` decides every name and shape; :meth:`Transplant.setup` calls it (also in
fast validation, which runs the same set-up on weightless models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ConfigError, short
from .base import METHODS, Method, Roles

Name = Annotated[str, Field(min_length=1, max_length=300)]


class RenamedLayer(BaseModel):
    """A layer whose source entry has another name (``{source: NAME, target: NAME}``)."""

    model_config = ConfigDict(extra="forbid")
    source: Name
    target: Name


class TransplantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: Literal["all"] | Annotated[list[Name | RenamedLayer], Field(min_length=1)] = Field(
        "all", description="all: every target entry with a compatible same-named source entry; or module "
                           "prefixes / parameter names of the target (source: the same name unless renamed)")
    parts: Literal["block", "weights"] = Field(
        "block", description="block: everything under a named module (weights, biases, norms, running "
                             "statistics); weights: only the >= 2-D weights of conv/linear layers")
    selection: Literal["uniform"] = Field(
        "uniform", description="smaller target dims take source index floor(i * n_src / n_tgt) (weight selection)")
    freeze: bool = Field(False, description="transplanted parameters do not train")
    control: Literal["none", "untrained_source"] = Field(
        "none", description="untrained_source: copy from the source at its seed's initialisation")


#: numbers reported every epoch (constant: the copy happened at set-up)
METRICS = ("transplant/entries_copied", "transplant/entries_selected", "transplant/entries_skipped",
           "transplant/fraction_of_target")


@dataclass(frozen=True)
class Entry:
    """One target state-dict entry and the source entry it comes from."""

    target: str
    source: str
    shape: tuple[int, ...]         # the target's
    source_shape: tuple[int, ...]
    parameter: bool                # a target parameter (else a buffer)

    @property
    def selected(self) -> bool:
        return self.shape != self.source_shape


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)
    skipped: int = 0               # ``layers: all``: same-named entries of incompatible shapes
    target_numel: int = 0          # elements in the target's parameters

    def metrics(self) -> dict[str, float]:
        moved = sum(_numel(e.shape) for e in self.entries if e.parameter)
        n_sel = sum(e.selected for e in self.entries)
        return {"transplant/entries_copied": len(self.entries) - n_sel, "transplant/entries_selected": n_sel,
                "transplant/entries_skipped": self.skipped,
                "transplant/fraction_of_target": moved / max(1, self.target_numel)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def selectable(target: tuple[int, ...], source: tuple[int, ...]) -> bool:
    """Copy (equal shapes) or weight selection (same dims, none larger in the target)."""
    return len(target) == len(source) and all(t <= s for t, s in zip(target, source))


def select_uniform(src: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``src`` reduced to ``shape``: index ``floor(i * n_src / n_tgt)`` along every smaller dim
    (a ``meta`` tensor, in fast validation: a meta tensor of that shape, without computing)."""
    if src.is_meta:
        return src.new_empty(shape)
    out = src
    for d, n in enumerate(shape):
        m = out.shape[d]
        if n != m:
            out = out.index_select(d, torch.arange(n, device=out.device) * m // n)
    return out


def _shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every state-dict entry: (shape, is a parameter). Works on meta-device models."""
    params = {n for n, _ in model.named_parameters()}
    return {n: (tuple(t.shape), n in params) for n, t in model.state_dict(keep_vars=True).items()}


def _is_layer_weight(model: nn.Module, name: str, shape: tuple[int, ...]) -> bool:
    """A >= 2-D ``weight`` of a conv or linear layer (``parts: weights``)."""
    mod, _, attr = name.rpartition(".")
    if attr != "weight" or len(shape) < 2:
        return False
    try:
        m = model.get_submodule(mod)
    except AttributeError:
        return False
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def _scope(model: nn.Module, shapes: dict, name: str, parts: str) -> list[str]:
    """The target entries a layer name stands for: a parameter/buffer itself, else every entry
    under the module prefix (``parts: weights``: only its conv/linear weights)."""
    if name in shapes:
        return [name]
    under = [k for k in shapes if k.startswith(name + ".")]
    if parts == "weights":
        under = [k for k in under if _is_layer_weight(model, k, shapes[k][0])]
    return under


def _incompatible(t_name: str, t_shape: tuple, s_name: str, s_shape: tuple) -> str:
    what = "more dims" if len(t_shape) > len(s_shape) else "fewer dims" if len(t_shape) < len(s_shape) else \
        "a larger dim"
    return (f"target '{short(t_name)}' is {t_shape} but source '{short(s_name)}' is {s_shape}: the target has "
            f"{what}; weight selection needs the same number of dims and no target dim larger than the source's")


def plan_transplant(options: TransplantOptions, source: nn.Module, target: nn.Module) -> Plan:
    """Which target entries come from which source entries (and whether by copy or weight
    selection); :class:`ConfigError` for names or shapes the options cannot use. Reads only
    names, shapes, module types and ``requires_grad`` (weightless models work)."""
    src, tgt = _shapes(source), _shapes(target)
    plan = Plan(target_numel=sum(p.numel() for p in target.parameters()))
    if options.layers == "all":
        for name, (shape, is_param) in tgt.items():
            if options.parts == "weights" and not _is_layer_weight(target, name, shape):
                continue
            if name not in src:
                continue
            if selectable(shape, src[name][0]):
                plan.entries.append(Entry(name, name, shape, src[name][0], is_param))
            else:
                plan.skipped += 1
        if not plan.entries:
            what = "conv/linear weight" if options.parts == "weights" else "entry"
            raise ConfigError("method.options.layers", f"no target {what} has a same-named source entry of a "
                                                       "compatible shape: nothing to transplant (different model "
                                                       "families? name the layers, {source: ..., target: ...})")
    else:
        owner: dict[str, int] = {}
        for i, item in enumerate(options.layers):
            f = f"method.options.layers.{i}"
            t_name, s_name = (item, item) if isinstance(item, str) else (item.target, item.source)
            t_field, s_field = (f, f) if isinstance(item, str) else (f"{f}.target", f"{f}.source")
            names = _scope(target, tgt, t_name, options.parts)
            if not names:
                if t_name in tgt or any(k.startswith(t_name + ".") for k in tgt):  # parts: weights filtered all
                    raise ConfigError(t_field, f"target '{short(t_name)}' holds no conv/linear weight (parts: "
                                               "weights)")
                raise ConfigError(t_field, f"'{short(t_name)}' names no parameter or module of the target")
            if s_name not in src and not any(k.startswith(s_name + ".") for k in src):
                raise ConfigError(s_field, f"'{short(s_name)}' names no parameter or module of the source")
            for name in names:
                s_key = s_name + name[len(t_name):]
                if s_key not in src:
                    raise ConfigError(s_field, f"the source has no '{short(s_key)}' for target '{short(name)}'")
                if name in owner:
                    raise ConfigError(t_field, f"target '{short(name)}' is already transplanted by "
                                               f"method.options.layers.{owner[name]}")
                shape, is_param = tgt[name]
                if not selectable(shape, src[s_key][0]):
                    raise ConfigError(f, _incompatible(name, shape, s_key, src[s_key][0]))
                owner[name] = i
                plan.entries.append(Entry(name, s_key, shape, src[s_key][0], is_param))
    if options.freeze:
        moved = {e.target for e in plan.entries}
        if not any(p.requires_grad and n not in moved for n, p in target.named_parameters()):
            raise ConfigError("method.options.freeze", "every trainable target parameter is transplanted and "
                                                       "frozen: nothing would train")
    return plan


@METHODS.register("transplant")
class Transplant(Method):
    Options = TransplantOptions
    epoch_metric_names = METRICS

    def __init__(self, options: TransplantOptions, cfg):
        super().__init__(options, cfg)
        self.plan: Plan | None = None

    @classmethod
    def roles(cls, options: TransplantOptions | None = None) -> Roles:
        """One process: the target reads the source's weights once, at set-up; only the target
        trains. The untrained-source control copies from the source at its seed's initialisation."""
        untrained = options is None or options.control == "untrained_source"
        return Roles(trained=("target",), untrained=("source",) if untrained else ())

    def config_warnings(self, roles: dict) -> list[str]:
        """A source without trained weights (the copy is then the untrained control), and
        same-named entries ``layers: all`` skips for their shapes."""
        from ..models import MODELS

        out = []
        s = self.cfg.source
        pretrained = getattr(MODELS.options(s.model.name, s.model.options), "pretrained", False)
        if self.options.control == "none" and s.init_from is None and not pretrained:
            out.append("source.init_from: not set, so the source is at its seed's initialisation and the "
                       "transplant copies untrained weights (what control: untrained_source measures)")
        plan = self.plan or plan_transplant(self.options, roles["source"].model, roles["target"].model)
        if plan.skipped:
            out.append(f"method.options.layers: {plan.skipped} same-named entries have shapes weight selection "
                       "cannot use and keep the target's initialisation (transplant/entries_skipped)")
        return out

    @torch.no_grad()
    def setup(self, roles: dict) -> None:
        source, target = roles["source"].model, roles["target"].model
        self.plan = plan_transplant(self.options, source, target)
        s_state = source.state_dict()
        t_state = target.state_dict(keep_vars=True)
        for e in self.plan.entries:
            dst = t_state[e.target]
            dst.copy_(select_uniform(s_state[e.source], e.shape).to(device=dst.device, dtype=dst.dtype))
            if self.options.freeze and e.parameter:
                dst.requires_grad_(False)

    def epoch_metrics(self) -> dict[str, float]:
        return self.plan.metrics() if self.plan is not None else {}
