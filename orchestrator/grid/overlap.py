"""Do donors train on their targets' validation or test examples?

A grid's ``sources:`` train donors that its trials load (``init_from: sources:NAME``). If a donor
trained on examples that a target validates on, the validation split no longer measures the
target alone: epoch and configuration choices shift toward what the donor saw. Two tools:

- :func:`donor_warnings` (validation, static): a donor that trains on the same task as a target
  without the same ``task.options.val_pool`` may train on the target's validation examples;
  with the same ``val_pool`` the two are disjoint by construction (``mergenet_core/data/common.py``).
- :func:`overlap_markdown` (``mergenet overlap GRID.yaml``): the exact counts, by content,
  for every verdict and search seed: each example of the target's validation and test splits
  is hashed and looked up among the donor's training examples.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def _init_path(role) -> str | None:
    return None if role is None or role.init_from is None else str(role.init_from.path)


def _donors(grid, dirs: dict) -> dict[tuple[str, str], tuple[str, Any]]:
    """(pair, arm) -> (donor name, the trial config of the first seed) for every trial whose
    source starts from a declared source."""
    by_dir = {str(d): name for name, d in dirs.items()}
    out = {}
    for p in grid.pairs:
        for arm in grid.methods:
            try:
                cfg = grid.trial_config(p.name, arm, grid.seeds[0])
            except Exception:  # noqa: BLE001 -- load_grid reports invalid trials itself
                continue
            name = by_dir.get(_init_path(cfg.source) or "")
            if name is not None:
                out[(p.name, arm)] = (name, cfg)
    return out


def _task_key(task) -> tuple[str, str | None]:
    return task.name, (task.options or {}).get("root")


def donor_warnings(grid, configs: dict, dirs: dict) -> list[str]:
    """One line per (pair, donor) whose donor may train on the target's validation examples."""
    lines, seen = [], set()
    for (pair, arm), (name, cfg) in _donors(grid, dirs).items():
        donor = configs[name].target.task
        target = cfg.target.task
        if _task_key(donor) != _task_key(target) or (pair, name) in seen:
            continue
        seen.add((pair, name))
        pool_d, pool_t = (donor.options or {}).get("val_pool"), (target.options or {}).get("val_pool")
        if pool_d is None or pool_d != pool_t:
            lines.append(f"pairs[{pair}] method[{arm}]: sources.{name}.target.task.options.val_pool: the donor "
                         f"trains on {target.name} without the target's val_pool ({pool_t}), so it may train on "
                         "the target's validation examples (give both the same val_pool; `mergenet overlap` "
                         "counts them)")
    return lines


#: fields that carry no example content of their own (identical across many examples)
NOT_CONTENT = {"attention_mask", "token_type_ids"}


def _fields(x) -> dict[str, torch.Tensor]:
    """An example batch's content fields by name: a plain image tensor is ``image``, a plain token
    tensor ``input_ids``; images held by reference are materialised."""
    if not isinstance(x, dict):
        x = {"image" if x.dim() == 4 else "input_ids": x}
    return {k: v if isinstance(v, torch.Tensor) else v.to("cpu") for k, v in x.items() if k not in NOT_CONTENT}


def _hashes(x) -> dict[str, list[bytes]]:
    """Per content field, one digest per example (so a donor trained on images alone is found in
    a target whose examples pair those images with questions)."""
    out = {}
    for k, v in _fields(x).items():
        rows = v.reshape(v.shape[0], -1).contiguous().numpy()
        out[k] = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]
    return out


def _count(target: dict[str, list[bytes]], donor: dict[str, set[bytes]]) -> int:
    """Target examples any of whose content fields the donor trained on."""
    shared = [k for k in target if k in donor]
    n = len(next(iter(target.values()))) if target else 0
    return sum(any(target[k][i] in donor[k] for k in shared) for i in range(n))


def _overlap_rows(grid, configs: dict, dirs: dict) -> list[dict]:
    from mergenet_core.data import build_task, task_title

    seeds = list(grid.seeds) + [s for s in (grid.select.seeds if grid.select else []) if s not in grid.seeds]
    groups: dict[tuple, list[str]] = {}
    cfgs = {}
    for (pair, arm), (name, cfg) in _donors(grid, dirs).items():
        key = (pair, name, json.dumps(cfg.target.task.model_dump(mode="json"), sort_keys=True))
        groups.setdefault(key, []).append(arm)
        cfgs[key] = cfg
    rows = []
    for key, arms in groups.items():
        pair, name, _ = key
        donor = configs[name]
        donor_x = build_task(donor.target.task.name, donor.target.task.options, donor.seed).train
        seen = {k: set(v) for k, v in _hashes(donor_x.x).items()}
        task = cfgs[key].target.task
        val, test = [], []
        for seed in seeds:
            data = build_task(task.name, task.options, seed)
            val.append((_count(_hashes(data.val.x), seen), len(data.val)))
            test.append((_count(_hashes(data.test.x), seen), len(data.test)))
        rows.append({"pair": pair, "donor": name, "arms": arms, "data": task_title(task.name),
                     "donor_train": len(donor_x), "seeds": seeds, "val": val, "test": test})
    return rows


def _span(counts: list[tuple[int, int]]) -> str:
    lo, hi = min(c for c, _ in counts), max(c for c, _ in counts)
    sizes = sorted({n for _, n in counts})
    size = "/".join(f"{n:,}" for n in sizes)
    return f"{lo}" + (f"–{hi}" if hi != lo else "") + f" of {size}"


def overlap_markdown(paths: list[str], grids: list) -> str:
    """Per grid (``grids``: the loaded grids of the files ``paths``), pair and donor: how many of the
    target's validation and test examples (per seed, min–max over the verdict and search seeds)
    the donor trained on."""
    lines = [f"*Written by `mergenet overlap {' '.join(paths)}`*. For each donor that a grid's trials load "
             "(`init_from: sources:NAME`): how many of the target's validation and test examples the donor "
             "trained on, found by content (each content field of every example hashed: an example counts when "
             "any of its fields, e.g. its image, is one the donor trained on), min–max over the grid's verdict and "
             "search seeds. Pretrained weights shipped in packages (MiniLM) are not covered: their corpora "
             "are not ours to check.", "",
             "| grid | pair | donor (its training examples) | arms | target data | target validation examples in the "
             "donor's training set | test examples |", "|---|---|---|---|---|---|---|"]
    for path, grid in zip(paths, grids):
        configs, dirs = grid.source_plan() if grid.sources else ({}, {})
        rows = _overlap_rows(grid, configs, dirs)
        if not rows:
            lines.append(f"| `{Path(path).name}` | – | no donor from `sources:` | – | – | – | – |")
        for r in rows:
            arms = ", ".join(f"`{a}`" for a in r["arms"])
            lines.append(f"| `{Path(path).name}` | `{r['pair']}` | `{r['donor']}` ({r['donor_train']:,}) | {arms} | "
                         f"{r['data']} | {_span(r['val'])} | {_span(r['test'])} |")
    return "\n".join(lines) + "\n"
