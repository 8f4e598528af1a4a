"""Grid configs: pairs × methods × seeds × hyperparameter axes, validated before Ray starts.

A grid YAML names the pairs (source/target model + task, and the layer pairs MergeNet and
param_share use), the methods with their options, the seeds, search axes over any dotted
pair-config field (``grid``, ``choice``, ``loguniform``, ``uniform``), the scheduler, the
per-trial resources and the concurrency. :func:`orchestrator.grid.load.load_grid` validates the grid itself and
then every trial configuration it can enumerate (random axes at their bounds), so a bad
grid exits with code 2 before any cluster work.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr,
                      field_validator, model_validator)

from mergenet_core.config import apply_overrides, deep_merge
from orchestrator.config import PairConfig, parse_config
from mergenet_core.errors import short


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", description="short id, used in trial names")
    source: dict[str, Any] | None = None
    target: dict[str, Any]
    layer_pairs: list[dict[str, Any]] = Field(default_factory=list,
                                              description="injected into mergenet / param_share options")
    overrides: dict[str, Any] = Field(default_factory=dict, description="any pair-config fields for this pair")
    arms: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="ARM -> {dotted pair-config field: value}: fields that this pair's "
                                          "trials of that arm replace (e.g. a transplant arm's donor: "
                                          "`source: {model: ..., init_from: sources:NAME}`)")


class Axis(_Strict):
    grid: list[Any] | dict[str, Any] | None = Field(
        None, description="every value (a list), or LABEL -> value (a mapping): trials and reports then show the "
                          "label (e.g. a set of layer pairs: `{one: [...], all: [...]}`)")
    choice: list[Any] | None = None
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Axis":
        kinds = [k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of grid, choice, loguniform, uniform")
        lo_hi = self.loguniform or self.uniform
        if lo_hi and not lo_hi[0] < lo_hi[1]:
            raise ValueError("bounds must be increasing")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be > 0")
        if (self.grid is not None and not self.grid) or (self.choice is not None and not self.choice):
            raise ValueError("needs at least one value")
        return self

    def bounds(self) -> list[Any]:
        """Values checked at validation time (every grid/choice value -- a named grid's labels --,
        both random bounds)."""
        return list(self.grid or self.choice or self.loguniform or self.uniform)

    def value(self, v: Any) -> Any:
        """The field's value for a trial's axis value (a named grid's label -> its value)."""
        return self.grid[v] if isinstance(self.grid, dict) and isinstance(v, str) and v in self.grid else v


def _never_test(metric: str) -> str:
    """A metric that decides anything (a scheduler's, a search's) must not read the test split."""
    if "test" in re.split(r"[/_.\-]", metric.lower()):
        raise ValueError(f"'{short(metric, 60)}' is a test metric; selection and scheduling read the validation "
                         "split only (e.g. target/val_acc, target/best_val_acc)")
    return metric


#: a metric that selects or schedules trials: anything but a test metric
DecidingMetric = Annotated[str, AfterValidator(_never_test)]


class SchedulerSpec(_Strict):
    name: Literal["fifo", "asha", "pbt"] = "fifo"
    metric: DecidingMetric = "target/val_acc"
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = Field(1, description="asha: epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    perturbation_interval: PositiveInt = Field(2, description="pbt: epochs between exploit/explore")
    hyperparam_mutations: dict[str, Axis] = Field(default_factory=dict, description="pbt: dotted field -> axis")

    @model_validator(mode="after")
    def _pbt(self) -> "SchedulerSpec":
        if self.name == "pbt" and not self.hyperparam_mutations:
            raise ValueError("pbt needs at least one entry in scheduler.hyperparam_mutations")
        return self


class ResourcesSpec(_Strict):
    """Per trial; applied to every pair's ``ray`` section (a pair's overrides may still set it)."""

    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float | None = Field(None, gt=0, description="use_gpu: GPUs per role worker / inline trial "
                                                                  "(default 1; 0.5: two per GPU); ray.gpus_per_worker")
    adapter_num_cpus: float = Field(0.0, ge=0)
    adapter_num_gpus: float = Field(0.0, ge=0)
    trial_driver_cpus: float = Field(0.01, gt=0, description="the Tune function that starts the pair's trainer")


class ReportSpec(_Strict):
    """The report ``mergenet run`` writes at the end (``mergenet report``'s options)."""

    baseline: str = Field("alone", description="arm every other arm is paired with")
    controls: list[str] = Field(default_factory=list, description="also pair every other arm with these arms "
                                                                  "(negative controls, e.g. mergenet_untrained)")
    verdicts: list[str] = Field(default_factory=list, description="ARM:CONTROL: a one-line transfer verdict per "
                                                                  "pair for ARM against its negative-control arm")
    positive_controls: list[str] = Field(
        default_factory=list, description="arms whose gain over the baseline must be shown (e.g. transplant from a "
                                          "trained donor); where none is, a pair's verdicts read 'cannot measure'")
    effect_points: float = Field(1.0, gt=0, allow_inf_nan=False,
                                 description="true gain (points) the paired tables' 'seeds needed' column is for")
    results_md: str | None = Field(None, description="also write the report as a section of this Markdown file "
                                                     "(e.g. docs/RESULTS.md; relative to the working directory)")
    section: str | None = Field(None, description="that section's title (default: the grid name); re-running "
                                                  "replaces only this section")

    @field_validator("verdicts")
    @classmethod
    def _arm_control(cls, v: list[str]) -> list[str]:
        for x in v:
            arm, sep, ctl = x.partition(":")
            if not (sep and arm and ctl):
                raise ValueError(f"'{x[:60]}' is not ARM:CONTROL")
        return v

    def verdict_pairs(self) -> list[tuple[str, str]]:
        return [tuple(x.split(":", 1)) for x in self.verdicts]


class SelectSpec(_Strict):
    """A search on the validation split that ``mergenet run`` runs before the grid: each searched
    arm's trials over ``search`` on ``seeds`` (disjoint from the grid's), the configuration with
    the best mean ``metric`` per pair chosen, and the grid then run with it for that arm and the
    arms that inherit it (its controls). orchestrator/grid/select.py."""

    arms: dict[str, list[str]] = Field(min_length=1, description="searched arm -> the arms that run with the "
                                                                 "configuration it wins (its controls)")
    search: dict[str, Axis] = Field(min_length=1, description="dotted pair-config field -> axis")
    seeds: list[int] = Field(min_length=1, description="search seeds; none of them a verdict seed (`seeds`)")
    metric: DecidingMetric = Field("target/best_val_acc", pattern=r"^[a-z_]+/[a-z_]*val[a-z_]*$",
                        description="a validation metric (never test): mean over the search seeds decides")
    mode: Literal["max", "min"] = "max"
    num_samples: PositiveInt = Field(1, description="samples of the random axes")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="e.g. asha; default: every "
                                                                                "trial to the end")


class GridConfig(_Strict):
    grid: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="grid name = MLflow experiment name")
    base: dict[str, Any] = Field(default_factory=dict, description="pair-config fields shared by every trial")
    pairs: list[PairEntry] = Field(min_length=1)
    methods: dict[str, dict[str, Any]] = Field(
        min_length=1, description="arm name -> options; the arm runs the method of its name, or the one its "
                                  "`method:` key names (two arms of one method: `mergenet` and "
                                  "`mergenet_untrained: {method: mergenet, ...}`)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    search: dict[str, Axis] = Field(default_factory=dict, description="dotted pair-config field -> axis")
    num_samples: PositiveInt = Field(1, description="samples of the random axes per grid point")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent_trials: PositiveInt = 2
    max_failures: int = Field(1, ge=0, description="Tune retries of a failed trial")
    keep_bundles: Literal["last_and_best", "last", "all", "none"] = Field(
        "last_and_best", description="pair bundles (checkpoints) each trial keeps: the last and the best-validation "
                                     "one, only the last, all written, or none once the trial has finished (the "
                                     "last is still written while it runs, so an interrupted trial resumes)")
    report: ReportSpec = Field(default_factory=ReportSpec, description="what `mergenet run` reports at the end")
    select: SelectSpec | None = Field(None, description="a search on the validation split run first; its winner "
                                                        "configures the named arms (orchestrator/grid/select.py)")
    sources: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="NAME -> a train config (as `mergenet train` takes; method alone by "
                                          "default): models trained (or reused from cache) before the trials; "
                                          "any init_from may name one as `sources:NAME` (orchestrator/grid/sources.py)")
    plugins: list[str] = Field(default_factory=list, description="modules or .py files (relative to the grid file) "
                                                                 "that register models, tasks, methods or modalities: "
                                                                 "every trial and source imports them")
    storage_path: str | None = Field(None, description="Tune/Train storage (default ./runs/grids): a local path, or "
                                                       "a bucket URI (s3://bucket/prefix, gs://...) on clusters")

    _parsed: dict = PrivateAttr(default_factory=dict)  # trial_config's parsed configs

    @property
    def bundles_while_running(self) -> str:
        """The ``keep_bundles`` a trial's pair runs with: ``none`` writes the last bundle while the
        trial runs (so it resumes) and the trial drops it when it ends."""
        return "last" if self.keep_bundles == "none" else self.keep_bundles

    @field_validator("storage_path")
    @classmethod
    def _storage_uri(cls, v: str | None) -> str | None:
        from orchestrator.cluster.storage import check_uri

        problem = check_uri(v) if v else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _unique(self) -> "GridConfig":
        names = [p.name for p in self.pairs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pairs: duplicate pair name(s) {sorted(dup)}")
        arms = set(self.methods)
        named = [self.report.baseline, *self.report.controls, *self.report.positive_controls,
                 *(a for v in self.report.verdict_pairs() for a in v)]
        unknown = sorted({a for a in named if a not in arms} - ({"alone"} if self.report.baseline == "alone" and
                                                                not self.report.verdicts else set()))
        if unknown:
            raise ValueError(f"report: no arm(s) {unknown} in methods ({', '.join(self.methods)})")
        for p in self.pairs:
            extra = sorted(set(p.arms) - arms)
            if extra:
                raise ValueError(f"pairs[{p.name}].arms: no arm(s) {extra} in methods ({', '.join(self.methods)})")
        bad = [n for n in self.sources if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}", n)]
        if bad:
            raise ValueError(f"sources: name '{short(bad[0], 40)}' must be letters, digits, _ . - (at most 60)")
        if self.select is not None:
            sel = self.select
            named = [*sel.arms, *(b for v in sel.arms.values() for b in v)]
            unknown = sorted({a for a in named if a not in arms})
            if unknown:
                raise ValueError(f"select.arms: no arm(s) {unknown} in methods ({', '.join(self.methods)})")
            twice = sorted({a for a in named if named.count(a) > 1})
            if twice:
                raise ValueError(f"select.arms: arm(s) {twice} named twice (each arm takes one winner)")
            shared = sorted(set(sel.seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"select.seeds: seed(s) {shared} are also verdict seeds (`seeds`); search on "
                                 "other seeds, so that the verdict is not measured where it was tuned")
            random = sorted(k for k, a in sel.search.items() if a.grid is None)
            if random:
                raise ValueError(f"select.search: {random[0]}: give a grid (every seed must see the same values "
                                 "for their mean to decide)")
            if sel.scheduler.name == "pbt":
                raise ValueError("select.scheduler: pbt changes a trial's configuration as it runs; use fifo or asha")
        if self.scheduler.name == "pbt" and (len(self.pairs) > 1 or len(self.methods) > 1):
            raise ValueError("scheduler: pbt copies a donor trial's whole config on exploit (pair and arm "
                             "included), which would mix arms; use one pair and one arm per PBT grid")
        return self

    # ----------------------------------------------------------------- composition
    def method_of(self, arm: str) -> str:
        """The method an arm runs: its ``method:`` key, else the arm's own name."""
        return str(self.methods[arm].get("method", arm))

    def trial_dict(self, pair: str, arm: str, seed: int, hp: dict[str, Any] | None = None) -> dict:
        """The pair-config dict of one trial (``arm``: a key of ``methods``)."""
        p = next(x for x in self.pairs if x.name == pair)
        opts = {k: v for k, v in self.methods[arm].items() if k != "method"}
        method = self.method_of(arm)
        if p.layer_pairs and "layer_pairs" not in opts:
            injected = _layer_pairs_for(method, p.layer_pairs)
            if injected is not None:
                opts["layer_pairs"] = injected
        r = self.resources
        d = deep_merge(self.base, {
            "name": f"{self.grid}.{pair}.{arm}.s{seed}",
            "seed": seed,
            "target": p.target,
            "method": {"name": method, "options": opts},
            "ray": {"cpus_per_worker": r.cpus_per_worker, "use_gpu": r.use_gpu,
                    **({"gpus_per_worker": r.gpus_per_worker} if r.gpus_per_worker is not None else {}),
                    "adapter": {"num_cpus": r.adapter_num_cpus, "num_gpus": r.adapter_num_gpus}},
        })
        if self.plugins:
            d["plugins"] = list(dict.fromkeys([*self.plugins, *d.get("plugins", [])]))
        if not uses_source(method):  # e.g. alone: no source model to build
            d.pop("source", None)
        elif p.source is not None:
            d["source"] = deep_merge(self.base.get("source", {}), p.source)
        d = deep_merge(d, p.overrides)
        d = apply_overrides(d, [f"{k}={_yaml(v)}" for k, v in p.arms.get(arm, {}).items()])
        axes = {**(self.select.search if self.select else {}), **self.search, **self.scheduler.hyperparam_mutations}
        return apply_overrides(d, [f"{k}={_yaml(axes[k].value(v) if k in axes else v)}"
                                   for k, v in (hp or {}).items()])

    def source_plan(self) -> tuple[dict[str, PairConfig], dict[str, Path]]:
        """The declared sources' validated configs and their cache folders."""
        from orchestrator.grid import sources

        configs = sources.source_configs(self.sources, self.plugins)
        return configs, sources.source_dirs(configs, self.storage_path)

    def trial_config(self, pair: str, arm: str, seed: int, hp: dict[str, Any] | None = None) -> PairConfig:
        """The trial's validated pair config, parsed once per process (validation, the tuner, each
        trial's resources and the trial driver ask for the same ones). Treat it as read-only."""
        key = (pair, arm, seed, json.dumps(hp or {}, sort_keys=True, default=str))
        if key not in self._parsed:
            self._parsed[key] = parse_config(self.trial_dict(pair, arm, seed, hp))
        return self._parsed[key]

    def enumerate_checks(self):
        """Every (pair, method, seed-free) combination with every axis value to validate."""
        axes = {**self.search, **self.scheduler.hyperparam_mutations}
        selected = {}
        for arm, inherit in (self.select.arms.items() if self.select else ()):
            selected.update({a: self.select.search for a in (arm, *inherit)})
        for p in self.pairs:
            for m in self.methods:
                ax = {**selected.get(m, {}), **axes}  # a selected arm: each search value too
                ks = list(ax)
                for values in itertools.product(*[ax[k].bounds() for k in ks]) if ks else [()]:
                    yield p.name, m, dict(zip(ks, values))

    def trial_count(self) -> int:
        n = len(self.pairs) * len(self.methods) * len(self.seeds) * self.num_samples
        for a in self.search.values():
            if a.grid is not None:
                n *= len(a.grid)
        return n


def uses_source(method: str) -> bool:
    from mergenet_core.methods import METHODS

    return method not in METHODS or "source" in METHODS.get(method).fn.roles().needed


def _layer_pairs_for(method: str, layer_pairs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The pair's ``layer_pairs`` for a method whose options have a ``layer_pairs`` list, each
    entry cut to the keys that method's layer-pair model knows (``param_share`` takes
    source/target, not MergeNet's mode/rank); ``None`` for methods without layer pairs."""
    import typing

    from mergenet_core.methods import METHODS

    if method not in METHODS:
        return None
    field = METHODS.get(method).options.model_fields.get("layer_pairs")
    if field is None:
        return None
    item = next((a for a in typing.get_args(field.annotation) if isinstance(a, type)), None)
    keys = set(item.model_fields) if item is not None and hasattr(item, "model_fields") else None
    return [{k: v for k, v in lp.items() if keys is None or k in keys} for lp in layer_pairs]


def _yaml(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


