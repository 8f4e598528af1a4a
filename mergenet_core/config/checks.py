"""Full validation of a pair config: the schema (``mergenet_core.config``), then every
registry-backed option block against the named entry's options model, then the method's own
checks across fields. :func:`load_config` / :func:`parse_config` raise :class:`ConfigErrors`
with one ``field: problem`` line per error (full field path, e.g.
``target.model.options.width``).

``schema``: the config model to validate against; hosts pass their extension of
:class:`ExperimentConfig` (the orchestrator's adds the ``ray`` section).
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from . import (DATA_ENV, DATA_PREFIXES, PATH_OPTIONS, ConfigErrors, ExperimentConfig, _drop_inherited_recipe_errors,
               format_validation_error, read_config)
from ..data import TASKS
from ..data.modality import mismatch
from ..errors import ConfigError, short
from ..methods import METHODS
from ..models import MODELS
from ..plugins import load_plugins


def check_registries(cfg: ExperimentConfig) -> list[str]:
    """Validate every registry-backed option block; returns ``field: problem`` lines."""
    lines: list[str] = []

    def check(reg, name: str, options: dict, where: str) -> BaseModel | None:
        try:
            reg.get(name, field=f"{where}.name")
            return reg.options(name, options)
        except ConfigError as e:
            lines.append(str(e))
        except ValidationError as e:
            lines.extend(format_validation_error(e, f"{where}.options"))
        return None

    for role in ("source", "target"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        lines += unset_data_paths(spec, role)
        check(MODELS, spec.model.name, spec.model.options, f"{role}.model")
        check(TASKS, spec.task.name, spec.task.options, f"{role}.task")
        if spec.model.name in MODELS and spec.task.name in TASKS:  # as build_model checks, from the declarations
            mm = MODELS.get(spec.model.name).meta.get("modality")
            tm = TASKS.get(spec.task.name).meta.get("modality")
            problem = mismatch(spec.model.name, mm, spec.task.name, tm) if mm and tm else None
            if problem:
                lines.append(f"{role}.model.name: {problem}")
    options = check(METHODS, cfg.method.name, cfg.method.options, "method")
    if not lines and options is not None:  # the method's checks across fields, on its validated options
        lines.extend(METHODS.get(cfg.method.name).fn.check_config(cfg, options))
    return lines


def unset_data_paths(spec, role: str) -> list[str]:
    """A path option that still starts with ``$MERGENET_DATA``: the variable was not set when the
    config was read (reading leaves it as it is)."""
    return [f"{role}.{kind}.options.{k}: {short(v)}: ${DATA_ENV} is not set (export {DATA_ENV}=/folder/of/your/data)"
            for kind, block in (("model", spec.model), ("task", spec.task)) for k, v in block.options.items()
            if k in PATH_OPTIONS and isinstance(v, str) and v.startswith(DATA_PREFIXES)]


def parse_config(data: dict, schema: type[ExperimentConfig] = ExperimentConfig) -> ExperimentConfig:
    load_config_plugins(data)
    try:
        cfg = schema.model_validate(data)
    except ValidationError as e:
        raise ConfigErrors(_drop_inherited_recipe_errors(format_validation_error(e), data)) from None
    lines = check_registries(cfg)
    if lines:
        raise ConfigErrors(lines)
    fill_task_defaults(cfg)
    return cfg


def load_config_plugins(data: dict) -> None:
    """Import a config mapping's ``plugins:`` (and the installed entry points) before anything
    looks a name up in a registry; a failing plugin is one ``plugins: ...`` line."""
    plugins = data.get("plugins") if isinstance(data, dict) else None
    specs = [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []
    try:
        load_plugins(specs)
    except ConfigError as e:
        raise ConfigErrors([str(e)]) from None


def fill_task_defaults(cfg: ExperimentConfig) -> None:
    """A model entry's ``task_defaults`` (options -> task options: a Hugging Face model's own
    tokenizer, the normalisation a weights file was trained with) fill the role's task options the
    user left unset and the task's options model knows, where the task accepts them (a 3-value
    mean on a 1-channel task does not fill); written into the config, so every process that
    receives it prepares data alike."""
    for role in ("source", "target"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        defaults = MODELS.get(spec.model.name).meta.get("task_defaults")
        if defaults is None:
            continue
        known = TASKS.get(spec.task.name).options.model_fields
        fill = {k: v for k, v in defaults(MODELS.options(spec.model.name, spec.model.options)).items()
                if k in known and spec.task.options.get(k) is None and v is not None}
        try:
            TASKS.options(spec.task.name, {**spec.task.options, **fill})
        except ValidationError:
            continue
        spec.task.options.update(fill)


def load_config(path: str | Path, overrides: list[str] | None = None,
                schema: type[ExperimentConfig] = ExperimentConfig) -> ExperimentConfig:
    """Read, merge, override and fully validate an experiment config file."""
    return parse_config(read_config(path, overrides), schema)


def method_options(cfg: ExperimentConfig) -> BaseModel:
    return METHODS.options(cfg.method.name, cfg.method.options)


def method_roles(cfg: ExperimentConfig):
    """The method's :class:`~mergenet_core.methods.base.Roles` for this config (no method built)."""
    return METHODS.get(cfg.method.name).fn.roles(method_options(cfg))
