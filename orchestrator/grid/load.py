"""Reading a grid and checking every trial it can run, before any Ray or MLflow work:
:func:`load_grid` (the schema is :mod:`orchestrator.grid.config`), the layers of each pair
(:func:`check_layers`) and the scheduler's metric against what each trial reports."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from mergenet_core.config import ConfigErrors, format_validation_error, read_config
from mergenet_core.config.checks import load_config_plugins
from mergenet_core.errors import ConfigError, short
from mergenet_core.io.init_weights import validating
from orchestrator.config import PairConfig
from orchestrator.grid.config import GridConfig


def load_grid(path: str | Path, overrides: list[str] | None = None, deep: bool = True,
              warnings: list[str] | None = None, build: bool = True) -> GridConfig:
    """Read and validate a grid; with ``deep`` also every trial config and every pair's layers
    (their warnings, e.g. a layer pair writing into an unnormalised layer, go to ``warnings``):
    by building each pair (``build``, as ``mergenet run`` does), or from metadata and shapes
    only (``build=False``: ``mergenet validate`` without ``--deep``, see :func:`check_layers`)."""
    data = read_config(path, overrides)
    load_config_plugins(data)  # before the grid's names (methods, models, tasks) are looked up
    try:
        grid = GridConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigErrors(format_validation_error(e)) from None
    grid, plan = _resolve_sources(grid, data)
    if warnings is not None and grid.sources:
        from orchestrator.grid.overlap import donor_warnings

        warnings.extend(donor_warnings(grid, *plan))
    if deep:
        check_trials(grid, warnings, build)
    return grid


def check_trials(grid: GridConfig, warnings: list[str] | None, build: bool) -> None:
    """Every trial config the grid can enumerate, and each pair's layers once per arm, layer pairs
    and adapter (a search may vary them); raises every problem at once."""
    lines: list[str] = []
    checked_layers: set[tuple[str, str, str]] = set()
    for pair, method, hp in grid.enumerate_checks():
        where = f"pairs[{pair}] method[{method}]" + (f" {short(hp, 80)}" if hp else "")
        try:
            cfg = grid.trial_config(pair, method, grid.seeds[0], hp)
        except ConfigErrors as e:
            lines.extend(f"{where}: {line}" for line in e.lines)
            continue
        except ConfigError as e:
            lines.append(f"{where}: {e}")
            continue
        opts = cfg.model_dump(mode="json")["method"]["options"]
        key = (pair, method, json.dumps([opts.get("layer_pairs"), opts.get("adapter")], sort_keys=True))
        if key not in checked_layers:
            checked_layers.add(key)
            lines += _check_layers_and_metrics(grid, cfg, method, where, warnings, build)
    if lines:
        raise ConfigErrors(sorted(set(lines), key=lines.index))


def _check_layers_and_metrics(grid: GridConfig, cfg: PairConfig, method: str, where: str,
                              warnings: list[str] | None, build: bool) -> list[str]:
    found: list[str] = []
    with validating():  # a source not trained yet is checked at its planned shapes
        lines = [f"{where}: {line}" for line in check_layers(cfg, found, build=build)]
    if warnings is not None:
        warnings.extend(type(w)(f"{where}: {w}") for w in found)  # a method's Note stays one
    checks = [("scheduler.metric", grid.scheduler.metric)] if grid.scheduler.name != "fifo" else []
    if grid.select is not None and method in grid.select.arms and grid.select.scheduler.name != "fifo":
        checks.append(("select.scheduler.metric", grid.select.scheduler.metric))
    for field, metric in checks:
        problem = check_scheduler_metric(cfg, metric)
        if problem:
            lines.append(f"{where}: {field}: {problem}")
    return lines


def _resolve_sources(grid: GridConfig, data: dict) -> tuple[GridConfig, tuple[dict, dict]]:
    """``init_from: sources:NAME`` everywhere in the grid -> the source's cache folder; the
    untrained ones are registered for fast validation (``orchestrator/grid/sources.py``); also returns the
    plan (configs, folders), so that callers need not compute it again."""
    from orchestrator.grid import sources

    configs, dirs = grid.source_plan() if grid.sources else ({}, {})
    rest = {k: v for k, v in data.items() if k != "sources"}
    lines = sources.resolve_refs(rest, dirs)
    lines += [f"sources.{name}.{line}" for name, src in grid.sources.items()
              for line in sources.resolve_refs(src, {})]  # a source may not start from another
    if lines:
        raise ConfigErrors(lines)
    sources.plan(configs, dirs)
    return (GridConfig.model_validate({**rest, "sources": grid.sources}) if dirs else grid), (configs, dirs)


EPOCH_METRICS = ("epoch", "step", "time/train_s", "time/epoch_s")


ROLE_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")


def role_metrics(cfg: PairConfig, role: str) -> tuple[str, ...]:
    """A role's evaluation numbers: :data:`ROLE_METRICS` for a classification task; the val/test
    numbers are its task's modality's ``metric_names`` (retrieval adds its recalls)."""
    from mergenet_core.data import TASKS, get_modality

    task = cfg.role(role).task.name
    modality = TASKS.get(task).meta.get("modality") if task in TASKS else None
    names = get_modality(modality).metric_names if modality else ("loss", "acc")
    return ("train_loss", "train_acc", *(f"{s}_{n}" for s in ("val", "test") for n in names))


def reported_metrics(cfg: PairConfig) -> tuple[set[str], set[str]]:
    """(metrics the trial reports every epoch, metrics it reports only on evaluation epochs)."""
    from mergenet_core.config.checks import method_roles
    from mergenet_core.methods import METHODS

    every = set(EPOCH_METRICS)
    evals = {f"{r}/{k}" for r in method_roles(cfg).trained for k in role_metrics(cfg, r)}
    every |= set(METHODS.get(cfg.method.name).fn.epoch_metric_names)
    if cfg.target.recipe.eval_every == 1:
        every |= evals
    return every, evals


def check_scheduler_metric(cfg: PairConfig, metric: str) -> str | None:
    """A problem with the scheduler's metric for this trial (Tune fails at run time on a result
    without it), or None."""
    every, evals = reported_metrics(cfg)
    if metric in every:
        return None
    if metric in evals:
        return (f"'{short(metric, 40)}' is reported only every {cfg.target.recipe.eval_every} epochs "
                "(recipe.eval_every); the scheduler needs it every epoch")
    return (f"'{short(metric, 40)}' is not reported by this trial (it reports e.g. "
            f"{', '.join(sorted(m for m in every if '/' in m and not m.startswith('time'))[:6])})")


def check_layers(cfg: PairConfig, warnings: list[str] | None = None, build: bool = True) -> list[str]:
    """Layer names, ranks, missing data, ``init_from`` files; the method's warnings are
    appended to ``warnings``. ``build``: build the pair once on CPU (data, models, encodings,
    adapters; data loads are cached per process); else the fast check from file metadata and
    weightless models (:func:`mergenet_core.config.weightless.check_pair_shapes`: no Ray, no data
    decoded, no weights), which reports the same first error for what it can see."""
    from mergenet_core.config.checks import method_roles
    from mergenet_core.errors import MergenetError
    from orchestrator import topology

    if not build:
        from mergenet_core.config.weightless import check_pair_shapes

        lines = check_pair_shapes(cfg, warnings)
        if not lines:
            try:
                topology.choose(cfg).check(cfg, method_roles(cfg))
            except ConfigError as e:
                return [str(e)]
        return lines
    import torch

    from mergenet_core.training.loop import PairState

    try:
        pair = PairState.build(cfg, devices={n: torch.device("cpu") for n in ("source", "target")})
        topology.choose(cfg).check(cfg, method_roles(cfg))
    except MergenetError as e:
        return [str(e)]
    if warnings is not None:
        warnings.extend(pair.method.config_warnings(pair.roles))
    return []
