"""Experiment configuration: pydantic v2 models, YAML loading, ``extends:`` and ``--set``.

Structure is checked by pydantic (unknown keys are errors). This module knows no registry
and no host: registry-backed option blocks (``model.options``, ``task.options``,
``method.options``) are checked by :mod:`mergenet_core.config.checks` (``load_config`` /
``parse_config``), and hosts extend :class:`ExperimentConfig` with their own sections (the
orchestrator adds ``ray``: ``orchestrator/config.py``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from ..errors import ConfigError, MergenetError, short
from ..io.safe_yaml import load_yaml_text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class TaskSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerSpec(Strict):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    nesterov: bool = False


class ScheduleSpec(Strict):
    name: Literal["constant", "multistep", "cosine"] = "cosine"
    milestones: list[PositiveInt] = Field(default_factory=list, description="epochs (multistep)")
    gamma: PositiveFloat = 0.2
    warmup_epochs: float = Field(0.0, ge=0.0)


class Recipe(Strict):
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    epochs: PositiveInt = 1
    steps_per_epoch: PositiveInt | None = Field(None, description="cap on optimisation steps per epoch")
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 512
    eval_every: PositiveInt = Field(1, description="evaluate every N epochs (and always at the end)")
    augment: bool = True
    grad_clip: PositiveFloat | None = None
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class InitFrom(Strict):
    """Trained starting weights for a role: a ``mergenet train`` output folder, its
    ``checkpoint.pt``, or a plain ``state_dict`` file; a local path (relative to the config
    file that names it) or a bucket URI (``s3://...``). A string is the path."""

    path: str = Field(min_length=1)
    role: str | None = Field(None, description="which role of a pair bundle to take (default: the bundle's "
                                               "only role, else the role of the same name)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class RoleSpec(Strict):
    model: ModelSpec
    task: TaskSpec
    init_from: InitFrom | None = Field(None, description="start from trained weights (loaded weights_only)")
    train: list[Annotated[str, Field(min_length=1, max_length=300)]] | None = Field(
        None, min_length=1,
        description="only these parameters train (the rest of the model is frozen): parameter names or "
                    "module prefixes, '*' matching within a name (e.g. [classifier, features.2.conv.weight]); "
                    "each must match a parameter. A method's own parameters (MergeNet's learned factors) train")
    recipe: Recipe | None = Field(None, description="filled from the top-level recipe, deep-merged with this role's overrides")


class MethodSpec(Strict):
    name: str = "alone"
    options: dict[str, Any] = Field(default_factory=dict)


class ExperimentConfig(Strict):
    """One pair experiment: a target (and usually a source) trained side by side."""

    name: str = Field("pair", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$",
                      description="run name (the default output folder): letters, digits, _ . + -; no path separators")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    source: RoleSpec | None = None
    target: RoleSpec
    recipe: Recipe = Field(default_factory=Recipe)
    method: MethodSpec = Field(default_factory=MethodSpec)
    checkpoint_every: PositiveInt = Field(1, description="checkpoint every N epochs (and at the end)")
    plugins: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list,
        description="modules that register models, tasks, methods or modalities: importable names, or .py files "
                    "(relative to this config file); imported in every process that validates or builds the pair")

    @model_validator(mode="before")
    @classmethod
    def _merge_role_recipes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        top = data.get("recipe") or {}
        if isinstance(top, BaseModel):
            top = top.model_dump()
        for role in ("source", "target"):
            spec = data.get(role)
            if isinstance(spec, dict) and isinstance(top, dict):
                own = spec.get("recipe") or {}
                if isinstance(own, BaseModel):
                    own = own.model_dump(exclude_unset=True)
                if isinstance(own, dict):
                    data[role] = {**spec, "recipe": deep_merge(top, own)}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        if self.precision == "bf16" and self.device == "cpu":
            raise ValueError("precision: bf16 autocast is only supported with device cuda or auto")
        return self

    def role(self, name: str) -> RoleSpec:
        spec = getattr(self, name)
        if spec is None:
            raise ConfigError(name, "not configured")
        return spec


# --------------------------------------------------------------------------- errors


class ConfigErrors(MergenetError):
    """Several config problems; ``lines`` holds one ``field: problem`` line per error."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


def _loc(parts) -> str:
    return ".".join(short(p, 40) for p in parts if p != "__root__")


def format_validation_error(err: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        loc = _loc(([prefix] if prefix else []) + list(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        msg = short(msg, 200)
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


# --------------------------------------------------------------------------- loading


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Safe-load a YAML mapping, resolving ``extends:`` (a path or list of paths, relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"{path}: no such file")
    if path.resolve() in _seen:
        raise ConfigError("extends", f"{path}: circular extends")
    from ..io.safe_yaml import read_yaml_file

    data = read_yaml_file(path) or {}  # bounded: size, nesting, alias expansion; strict UTF-8
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping")
    resolve_paths(data, path.parent)
    bases = data.pop("extends", None)
    if bases is None:
        return data
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("extends", f"{path}: must be a file name or a list of file names")
    merged: dict = {}
    for b in bases:
        base = path.parent / b
        if not base.is_file():
            raise ConfigError("extends", f"{base}: no such file (extended by {path})")
        merged = deep_merge(merged, read_yaml(base, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


#: model / task options that name files: a relative one is resolved against the config file
#: that gives it (``root`` always; the others where the file exists there, since a Hugging Face
#: model or tokenizer may also be a name in the local cache)
PATH_OPTIONS = {"root": True, "weights": False, "checkpoint": False, "path": False, "tokenizer": False}
DATA_ENV = "MERGENET_DATA"
#: how a data path names that folder
DATA_PREFIXES = (f"${{{DATA_ENV}}}", f"${DATA_ENV}")


def resolve_paths(data: Any, base: Path, _where: tuple[str, ...] = ()) -> None:
    """Make every path a config file gives absolute, relative to ``base`` (the file's folder):
    ``init_from``, ``plugins`` files (``.py``), and the :data:`PATH_OPTIONS` of a model's or a
    task's ``options``. ``$MERGENET_DATA`` (or ``${MERGENET_DATA}``) at the start of a data path
    is that variable's folder, and a relative ``root`` that is missing beside the file is looked
    for under it. URIs and absolute paths stay as they are. Runs when a config is read (the
    trial receives absolute paths, never a process's working directory)."""
    if isinstance(data, list):
        for i, v in enumerate(data):
            resolve_paths(v, base, (*_where, str(i)))
        return
    if not isinstance(data, dict):
        return
    in_options = len(_where) >= 2 and _where[-1] == "options" and _where[-2] in ("model", "task")
    for k, v in data.items():
        if k == "init_from":
            if isinstance(v, str):
                data[k] = _resolve_path(v, base)
            elif isinstance(v, dict) and isinstance(v.get("path"), str):
                v["path"] = _resolve_path(v["path"], base)
        elif k == "plugins" and isinstance(v, list):
            data[k] = [_resolve_path(p, base) if isinstance(p, str) and p.endswith(".py") else p for p in v]
        elif in_options and k in PATH_OPTIONS and isinstance(v, str):
            data[k] = _resolve_data_path(v, base, PATH_OPTIONS[k])
        else:
            resolve_paths(v, base, (*_where, str(k)))


def _resolve_path(p: str, base: Path) -> str:
    # URIs, absolute paths, and a grid's `sources:NAME` (resolved by the grid to its folder)
    if "://" in p or Path(p).is_absolute() or not p or p.startswith("sources:"):
        return p
    return str((base / p).resolve())


def _resolve_data_path(p: str, base: Path, always: bool) -> str:
    import os

    for prefix in DATA_PREFIXES:
        if p.startswith(prefix):
            root = os.environ.get(DATA_ENV)
            if not root:  # left as it is: validation names the field (checks.unset_data_paths)
                return p
            return str(Path(root, p[len(prefix):].lstrip("/")).resolve())
    if "://" in p or Path(p).is_absolute() or not p:
        return p
    here = (base / p).resolve()
    if here.exists() or (always and not os.environ.get(DATA_ENV)):
        return str(here)
    under = Path(os.environ.get(DATA_ENV, ""), p).resolve() if os.environ.get(DATA_ENV) else None
    if under is not None and under.exists():
        return str(under)
    return str(here) if always else p


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A config file's mapping as validation takes it: read (``extends:``, paths resolved against
    the file), ``--set`` overrides applied (their paths resolved against the working directory);
    a problem is one :class:`ConfigErrors` line."""
    try:
        data = apply_overrides(read_yaml(path), overrides or [])
        resolve_paths(data, Path.cwd())
    except ConfigError as e:
        raise ConfigErrors([str(e)]) from None
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError("--set", f"'{short(item)}' is not of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml_text(raw, "--set") if raw != "" else ""
        except ConfigError as e:
            if "invalid YAML" not in e.problem:  # too large / deep / an alias bomb: refused
                raise ConfigError(f"--set {short(key, 40)}", e.problem.removeprefix("--set: ")) from None
            value = raw  # not YAML: the plain string
        parts = key.strip().split(".")
        cur: Any = data
        for i, p in enumerate(parts[:-1]):
            if isinstance(cur, list):
                cur = cur[_index(p, parts[: i + 1], cur)]
            else:
                nxt = cur.get(p)
                if not isinstance(nxt, (dict, list)):
                    nxt = cur[p] = {}
                cur = nxt
        last = parts[-1]
        if isinstance(cur, list):
            cur[_index(last, parts, cur)] = value
        else:
            cur[last] = value
    return data


def _index(p: str, path: list[str], seq: list) -> int:
    if not p.isdigit() or int(p) >= len(seq):
        raise ConfigError(".".join(path), f"no list element {p}")
    return int(p)


def _has_path(d: Any, parts: list[str]) -> bool:
    for p in parts:
        if not isinstance(d, dict) or p not in d:
            return False
        d = d[p]
    return True


def _drop_inherited_recipe_errors(lines: list[str], data: Any) -> list[str]:
    """A bad top-level ``recipe`` field is copied into every role's recipe by the merge; report
    it once (as ``recipe.x``), not again as ``source.recipe.x`` / ``target.recipe.x``, unless
    the role's own recipe sets that field itself."""
    top = {}
    for line in lines:
        loc, _, msg = line.partition(": ")
        if loc.startswith("recipe."):
            top[loc[len("recipe."):]] = msg
    out = []
    for line in lines:
        loc, _, msg = line.partition(": ")
        role, _, rest = loc.partition(".recipe.")
        if role in ("source", "target") and rest and top.get(rest) == msg:
            spec = data.get(role) if isinstance(data, dict) else None
            own = spec.get("recipe") if isinstance(spec, dict) else None
            if not _has_path(own, rest.split(".")):
                continue
        out.append(line)
    return out
