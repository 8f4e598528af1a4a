"""Cross-field checks a pydantic model of one block cannot make; run by ``parse_config``, so
``mergenet validate`` rejects these configs with the field path instead of failing later.

* MergeNet: two layer pairs that use the same weight of one role must agree on how it is
  encoded (``mode``, ``rank``, ``alpha``): the encoding is built once per weight, so the
  second pair's settings would be ignored silently.
"""
from __future__ import annotations

from typing import Any


def cross_checks(cfg) -> list[str]:
    lines: list[str] = []
    if cfg.method.name == "mergenet":
        lines.extend(_mergenet_layer_pairs(cfg.method.options))
    return lines


def _mergenet_layer_pairs(options: dict[str, Any]) -> list[str]:
    from .transfer import MergeNetOptions

    opts = MergeNetOptions.model_validate(options)
    src_role = "target" if opts.self_transfer else "source"
    seen: dict[tuple[str, str], tuple[int, tuple]] = {}
    lines = []
    for i, lp in enumerate(opts.layer_pairs):
        enc = (lp.mode, lp.rank, lp.alpha, lp.align)
        for side, role, param in (("source", src_role, lp.source), ("target", "target", lp.target)):
            key = (role, param)
            if key not in seen:
                seen[key] = (i, enc)
                continue
            j, other = seen[key]
            if other != enc:
                what = next(n for n, a, b in zip(("mode", "rank", "alpha", "align"), enc, other) if a != b)
                lines.append(f"method.options.layer_pairs.{i}.{what}: {role} weight '{param[:60]}' is also paired in "
                             f"layer_pairs.{j} with {what} {dict(zip(('mode', 'rank', 'alpha', 'align'), other))[what]}; "
                             "pairs sharing a weight must encode it the same way")
    return lines
