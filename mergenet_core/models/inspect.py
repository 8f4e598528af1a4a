"""Parameter roles and layer-pair suggestions for MergeNet.

:func:`describe` gives every named parameter a role from its module type, its name
(BERT patterns) and two class attributes our models carry: ``classifier_name`` (the final
linear; fallback: the last ``nn.Linear``) and ``last_stage_prefixes`` (name prefixes of the
last stage of a conv trunk). :func:`suggest_pairs` pairs source and target weights by role.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

ROLES = ("classifier", "last_stage_conv", "conv", "attention_output", "attention_qkv", "ffn",
         "embedding", "norm", "bias", "other")

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PATTERNS = [
    (re.compile(r"attention\.output\.dense\.weight$"), "attention_output"),
    (re.compile(r"attention\.self\.(query|key|value)\.weight$"), "attention_qkv"),
    (re.compile(r"(intermediate|output)\.dense\.weight$"), "ffn"),
]


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    numel: int
    role: str

    @property
    def pairable(self) -> bool:
        """A weight of 2 or more dims (matrix or conv kernel), not a norm/bias."""
        return len(self.shape) >= 2 and self.role not in ("norm", "bias")


def _classifier_name(model: nn.Module) -> str | None:
    name = getattr(model, "classifier_name", None)
    if name:
        return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def describe(model: nn.Module) -> list[ParamInfo]:
    """Every ``named_parameters()`` entry with its shape, size and role (see :data:`ROLES`)."""
    modules = dict(model.named_modules())
    cls = _classifier_name(model)
    prefixes = tuple(getattr(model, "last_stage_prefixes", ()))
    out = []
    for name, p in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        mod = modules.get(mod_name)
        if isinstance(mod, _NORMS):
            role = "norm"
        elif leaf == "bias":
            role = "bias"
        elif mod_name == cls and leaf == "weight":
            role = "classifier"
        elif isinstance(mod, nn.Embedding):
            role = "embedding"
        elif isinstance(mod, _CONVS) and leaf == "weight":
            role = "last_stage_conv" if name.startswith(prefixes) and prefixes else "conv"
        else:
            role = next((r for pat, r in _PATTERNS if pat.search(name)), "other")
        out.append(ParamInfo(name, tuple(p.shape), p.numel(), role))
    return out


# (source roles, target roles, reason), in priority order; roles listed first are preferred.
_RULES = [
    (("classifier",), ("classifier",), "classifier -> classifier"),
    (("last_stage_conv",), ("last_stage_conv",), "last-stage conv -> last-stage conv (largest first)"),
    (("attention_output",), ("last_stage_conv", "conv"), "attention output -> conv (text -> image)"),
    (("last_stage_conv", "conv"), ("attention_output",), "conv -> attention output (image -> text)"),
    (("attention_output",), ("attention_output",), "attention output -> attention output"),
    (("ffn",), ("ffn",), "ffn -> ffn"),
    (("conv",), ("conv",), "conv -> conv (largest first)"),
]


def _ranked(infos: list[ParamInfo], roles: tuple[str, ...]) -> list[ParamInfo]:
    """Pairable weights with a role in ``roles``: preferred role, then largest, then deepest."""
    pos = {p.name: i for i, p in enumerate(infos)}
    cands = [p for p in infos if p.pairable and p.role in roles]
    return sorted(cands, key=lambda p: (roles.index(p.role), -p.numel, -pos[p.name]))


def suggest_pairs(source: nn.Module, target: nn.Module, k: int = 5) -> list[tuple[str, str, str]]:
    """Up to ``k`` (source name, target name, reason) pairs, each name used at most once."""
    src, tgt = describe(source), describe(target)
    pairs: list[tuple[str, str, str]] = []
    used_s: set[str] = set()
    used_t: set[str] = set()
    for s_roles, t_roles, reason in _RULES:
        ss = [p for p in _ranked(src, s_roles) if p.name not in used_s]
        ts = [p for p in _ranked(tgt, t_roles) if p.name not in used_t]
        for s, t in zip(ss, ts):
            if len(pairs) >= k:
                return pairs
            pairs.append((s.name, t.name, reason))
            used_s.add(s.name)
            used_t.add(t.name)
    return pairs
