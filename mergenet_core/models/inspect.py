"""Parameter roles and layer-pair suggestions for MergeNet.

:func:`describe` gives every named parameter a role from its module type, its name
(BERT patterns) and two class attributes our models carry: ``classifier_name`` (the final
linear, or None for a model without one; fallback where absent: the last ``nn.Linear``) and ``last_stage_prefixes`` (name prefixes of the
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
    #: a normalisation layer (BatchNorm/LayerNorm/GroupNorm) follows this weight's layer in its block
    normalised: bool = False

    @property
    def pairable(self) -> bool:
        """A weight of 2 or more dims (matrix or conv kernel), not a norm/bias."""
        return len(self.shape) >= 2 and self.role not in ("norm", "bias")


def _classifier_name(model: nn.Module) -> str | None:
    if hasattr(model, "classifier_name"):  # None: the model has no classifier (retrieval)
        return model.classifier_name or None
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def normalised_layers(model: nn.Module) -> set[str]:
    """Names of the layers whose output goes into a normalisation layer.

    Read from the registration order of the leaf modules that hold parameters (the order the
    blocks of our models, torchvision-style CNNs and BERT define them: ``conv, bn``,
    ``dense, LayerNorm``): a layer counts as normalised when the next such leaf is a norm layer.
    Parameter-free leaves (activations, dropout, pooling) are skipped. A heuristic for
    suggesting layer pairs; it does not trace the forward pass.
    """
    leaves = [(n, m) for n, m in model.named_modules()  # a norm with children (timm's BatchNormAct2d) counts
              if (isinstance(m, _NORMS) or not list(m.children())) and any(True for _ in m.parameters(recurse=False))]
    out = set()
    for (name, mod), (_, nxt) in zip(leaves, leaves[1:]):
        if not isinstance(mod, _NORMS) and isinstance(nxt, _NORMS):
            out.add(name)
    return out


def describe(model: nn.Module) -> list[ParamInfo]:
    """Every ``named_parameters()`` entry with its shape, size, role (see :data:`ROLES`) and
    whether a normalisation layer follows its layer (:func:`normalised_layers`)."""
    modules = dict(model.named_modules())
    normed = normalised_layers(model)
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
        out.append(ParamInfo(name, tuple(p.shape), p.numel(), role, mod_name in normed))
    return out


def rank_targets(infos: list[ParamInfo]) -> list[ParamInfo]:
    """Pairable target weights, safest first: normalised layers (largest first), then the rest;
    classifiers and other unnormalised layers last."""
    pos = {p.name: i for i, p in enumerate(infos)}
    cands = [p for p in infos if p.pairable]
    return sorted(cands, key=lambda p: (not p.normalised, p.role == "classifier", -p.numel, -pos[p.name]))


# (source roles, target roles, reason), in priority order; roles listed first are preferred.
_RULES = [
    (("last_stage_conv",), ("last_stage_conv",), "last-stage conv -> last-stage conv (largest first)"),
    (("attention_output",), ("last_stage_conv", "conv"), "attention output -> conv (text -> image)"),
    (("last_stage_conv", "conv"), ("attention_output",), "conv -> attention output (image -> text)"),
    (("attention_output",), ("attention_output",), "attention output -> attention output"),
    (("ffn",), ("ffn",), "ffn -> ffn"),
    (("conv",), ("conv",), "conv -> conv (largest first)"),
    # classifiers have no normalisation after them: writes rescale the logits directly
    (("classifier",), ("classifier",), "classifier -> classifier (unnormalised target)"),
]
#: the rules that cross modalities (text -> image, image -> text); not used with a two-tower model,
#: whose image layers take image layers and whose text layers take text layers
_CROSS = {1, 2}


def _ranked(infos: list[ParamInfo], roles: tuple[str, ...]) -> list[ParamInfo]:
    """Pairable weights with a role in ``roles``: preferred role, then largest, then deepest."""
    pos = {p.name: i for i, p in enumerate(infos)}
    cands = [p for p in infos if p.pairable and p.role in roles]
    return sorted(cands, key=lambda p: (roles.index(p.role), -p.numel, -pos[p.name]))


def suggest_pairs(source: nn.Module, target: nn.Module, k: int = 5) -> list[tuple[str, str, str]]:
    """Up to ``k`` (source name, target name, reason) pairs, each name used at most once. With a
    two-tower model (``tower_prefixes``) on either side, no rule crosses modalities: conv layers
    pair with its image tower, attention / feed-forward layers with its text tower."""
    src, tgt = describe(source), describe(target)
    pairs: list[tuple[str, str, str]] = []
    used_s: set[str] = set()
    used_t: set[str] = set()
    towers = hasattr(source, "tower_prefixes") or hasattr(target, "tower_prefixes")
    for i, (s_roles, t_roles, reason) in enumerate(_RULES):
        if towers and i in _CROSS:
            continue
        ss = [p for p in _ranked(src, s_roles) if p.name not in used_s]
        # targets with a normalisation layer after them first (stable within each group)
        ts = sorted((p for p in _ranked(tgt, t_roles) if p.name not in used_t), key=lambda p: not p.normalised)
        for s, t in zip(ss, ts):
            if len(pairs) >= k:
                return pairs
            pairs.append((s.name, t.name, reason))
            used_s.add(s.name)
            used_t.add(t.name)
    return pairs
