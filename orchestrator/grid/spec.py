"""Every trial of a grid resolved once, in the driver, into an immutable :class:`TrialSpec`.

The driver validates the grid once (:func:`orchestrator.grid.load.load_grid`), draws every
trial point (pairs × arms × seeds × search values, the random axes sampled ``num_samples`` times
with Tune's own variant generator from a fixed seed, so a resumed grid draws the same points),
and resolves each point into its spec: the validated pair config, its topology's name and plan,
its resources, its MLflow tags, params and run name. Tune's ``param_space`` holds only each
trial's key (and its search values, which PBT mutates); the specs reach the trial processes
through the object store (``tune.with_parameters``), and every process after that receives
objects, never a config to parse again. A trial that PBT mutated is the one that resolves its
new point again, in its own process.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from mergenet_core.config import deep_merge
from orchestrator import topology, tracking
from orchestrator.cluster.storage import Location
from orchestrator.config import PairConfig
from orchestrator.grid.config import GridConfig

#: the seed of the random search axes' draws (the same points on every resolution of a grid)
DRAW_SEED = 0


@dataclass(frozen=True)
class Submission:
    """What every trial of one submission shares: the validated grid, the grid's storage folder,
    the MLflow ids and where to reach MLflow, the code's git sha (each trial's plugins: its spec's)."""

    grid: GridConfig
    folder: Location
    parent_run_id: str
    experiment_id: str
    uri: str
    sha: str


@dataclass(frozen=True)
class TrialSpec:
    """One trial, resolved: treat ``config`` as read-only (pydantic models are not frozen)."""

    key: str
    pair: str
    arm: str
    seed: int
    hp: dict[str, Any]
    config: PairConfig
    topology: str
    plan: Any
    resources: tuple[dict, ...]
    tags: dict[str, str]
    params: dict[str, str]
    run_name: str
    plugins: tuple[str, ...] = field(default=())

    def tune_config(self) -> dict:
        """What Tune holds of the trial: its key, and its search values (PBT mutates them)."""
        return {"key": self.key, "hp": dict(self.hp)}


def axis(a, pbt: bool = False):
    """A grid axis as a Tune search domain (PBT's mutations take plain lists)."""
    from ray import tune

    if a.grid is not None:  # a named grid: its labels (the trial config resolves them)
        return list(a.grid) if pbt else tune.grid_search(list(a.grid))
    if a.choice is not None:
        return tune.choice(a.choice)
    if a.loguniform is not None:
        return tune.loguniform(*a.loguniform)
    return tune.uniform(*a.uniform)


def points(grid: GridConfig) -> list[tuple[str, str, int, dict]]:
    """Every trial point ``(pair, arm, seed, hp)``: the grid's axes drawn by Tune's variant generator
    (``num_samples`` draws of the random axes per grid point; PBT's mutated keys start at a draw)."""
    import numpy as np
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    space = {"pair": tune.grid_search([p.name for p in grid.pairs]), "method": tune.grid_search(list(grid.methods)),
             "seed": tune.grid_search(grid.seeds),
             "hp": {**{k: axis(a) for k, a in grid.search.items()},
                    **{k: axis(a, pbt=True) if a.grid is None else tune.choice(list(a.grid))
                       for k, a in grid.scheduler.hyperparam_mutations.items() if k not in grid.search}}}
    rng = np.random.default_rng(DRAW_SEED)
    out = []
    for _ in range(grid.num_samples):
        for _, v in generate_variants(space, random_state=rng):
            out.append((v["pair"], v["method"], int(v["seed"]), dict(v.get("hp") or {})))
    return out


def resolve(grid: GridConfig, point: tuple, sub: Submission | None = None, index: int | None = None,
            plans: dict | None = None) -> TrialSpec:
    """The spec of one trial point (``index``: its draw, in the key when the grid draws random values)."""
    pair, arm, seed, hp = point
    cfg = grid.trial_config(pair, arm, seed, hp)
    topo = topology.choose(cfg)
    plan_key = (topo.name, config_hash(cfg, seed=False))
    if plans is None or plan_key not in plans:
        plan = topo.plan(cfg)
        if plans is not None:
            plans[plan_key] = plan
    else:
        plan = plans[plan_key]
    params = tracking.flatten(cfg.model_dump(mode="json"))
    short = short_params(pair, arm, hp, params)
    params.update({f"hp.{k}": str(v) for k, v in hp.items()}, **short)
    tags = {tracking.TRIAL_TAG: "1", "mergenet.grid": grid.grid, "mergenet.pair": pair, "mergenet.arm": arm,
            "mergenet.method": grid.method_of(arm), "mergenet.seed": str(seed), "mergenet.config_hash": config_hash(cfg),
            "mergenet.topology": topo.name, **pair_labels(grid, pair)}
    if sub is not None:
        tags.update({"mlflow.parentRunId": sub.parent_run_id, "mergenet.git_sha": sub.sha})
    # every search value (a random draw's to 4 digits: its index follows)
    values = {k: v if index is None else _fmt(str(v)) for k, v in hp.items()}
    key = f"{pair}/{arm}/s{seed}" + "".join(f" {k}={v}" for k, v in values.items())
    if index is not None:
        key += f" #{index}"
    return TrialSpec(key, pair, arm, seed, dict(hp), cfg, topo.name, plan,
                     tuple(topo.resources(cfg, grid.resources.trial_driver_cpus)), tags, params,
                     run_name(arm, seed, pair, short), tuple(cfg.plugins))


def _fmt(v: str) -> str:
    """A random draw in a trial's key: a float to 4 significant digits."""
    try:
        return f"{float(v):.4g}" if "." in v or "e" in v else v
    except ValueError:
        return v


def resolve_all(grid: GridConfig, sub: Submission | None = None) -> dict[str, TrialSpec]:
    """Every trial of ``grid``, by key, in Tune's order."""
    random = any(a.grid is None for a in grid.search.values()) or bool(grid.scheduler.hyperparam_mutations)
    plans: dict = {}
    specs = [resolve(grid, p, sub, i if random or grid.num_samples > 1 else None, plans)
             for i, p in enumerate(points(grid))]
    out = {s.key: s for s in specs}
    if len(out) != len(specs):  # every search value is in the key: this would be a bug of ours
        from mergenet_core.errors import MergenetError

        raise MergenetError(f"grid {grid.grid}: {len(specs) - len(out)} trials share a key with another")
    return out


def for_trial(specs: dict[str, TrialSpec], tune_config: dict, sub: Submission) -> TrialSpec:
    """The trial's spec; a trial whose search values PBT mutated resolves its new point here."""
    spec = specs[tune_config["key"]]
    hp = dict(tune_config.get("hp") or {})
    if hp == spec.hp:
        return spec
    return replace(resolve(sub.grid, (spec.pair, spec.arm, spec.seed, hp), sub), key=spec.key)


def config_hash(cfg, seed: bool = True) -> str:
    """12 hex digits of the SHA-256 of the trial's config as JSON with sorted keys, seed included
    and its ``name`` (``GRID.PAIR.ARM.sSEED``) left out: the same config gives the same hash in
    any grid and under any arm name (the report's ``config_hash``)."""
    data = cfg.model_dump(mode="json", exclude={"name"} if seed else {"name", "seed"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def short_params(pair: str, arm: str, hp: dict, config_params: dict[str, str]) -> dict[str, str]:
    """What varies across the grid, as short top-level params for MLflow's runs table: ``arm``,
    ``pair``, and each search axis by the shortest suffix of its dotted field that no other axis
    and no top-level config param shares (``method.options.adapter.lr`` -> ``lr``, or
    ``adapter.lr`` if another axis ends in ``lr``). ``seed`` is a config param already."""
    out = {"arm": arm, "pair": pair}
    keys = list(hp)
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[i:])
            clash = any(o != k and (o == name or o.endswith("." + name)) for o in keys)
            if not clash and name not in out and (name == k or name not in config_params):
                break
        if name != k:  # a top-level field (seed) is logged under its own name already
            out[name] = str(hp[k])
    return out


def run_name(arm: str, seed: int, pair: str, short: dict[str, str]) -> str:
    """``mergenet s3 · r18-mbv2 lr=0.001``: arm and seed first (the runs table cuts long names)."""
    extra = " ".join(f"{k}={v}" for k, v in short.items() if k not in ("arm", "pair"))
    return f"{arm} s{seed} · {pair}" + (f" {extra}" if extra else "")


def pair_labels(grid: GridConfig, pair: str) -> dict[str, str]:
    """``model@task`` of the pair's source and target (also on ``alone`` trials, for the report)."""
    p = next(x for x in grid.pairs if x.name == pair)

    def label(d):
        return f"{d['model']['name']}@{d['task']['name']}" if d else "-"

    src = deep_merge(grid.base.get("source", {}), p.source or {}) if (p.source or grid.base.get("source")) else None
    return {"mergenet.source": label(src), "mergenet.target": label(deep_merge(grid.base.get("target", {}), p.target))}
