"""The training loop every host runs (nanoGPT's one loop; the method owns only the step).

A *host* is where a pair's roles live: the single-process :class:`~mergenet_core.training.engine.Engine`
(both roles; also what a Tune trial runs in-process), or one Ray Train worker of the Ray pair
(one role, or the whole pair co-located). :class:`PairLoop` owns epochs, the evaluation
cadence, the per-epoch metrics record, best-validation tracking, the checkpoint policy, the
metrics file and the summary; a host says only how a step is taken, which process leads, how
records and role states are gathered, and where bundles go (:class:`Host`).

Checkpoint policy (the same everywhere): a bundle is written at every ``checkpoint_every``-th
epoch, at the last epoch of the run, and -- unless ``keep_bundles`` is ``last`` -- at every new
best-validation epoch (highest ``target/val_acc``; ties keep the earliest).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..config.checks import method_options
from ..config import ExperimentConfig
from ..errors import ConfigError, short
from ..plugins import load_plugins
from ..methods import METHODS, Method
from .roles import Role, build_role, build_weightless_role
from ..io import FINAL, METRICS  # noqa: F401 (re-exported)
from ..io.outputs import RunOutputs, summarise
from ..io.safe_io import load_checkpoint, save_checkpoint

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the bundle of the best-validation epoch
#: which bundles a run keeps (and so writes): the last and the best-validation one, only the
#: last, or every bundle written
KEEP_BUNDLES = ("last_and_best", "last", "all")


def save_bundle(path: Path, state: dict) -> None:
    """Atomic ``torch.save`` (a unique temp file, fsync, rename; removed on failure)."""
    save_checkpoint(path, state)


def load_bundle(path: Path) -> dict:
    """``torch.load(weights_only=True)``; a bad file is one :class:`MergenetError` line."""
    return load_checkpoint(path)


def numeric(record: dict) -> dict[str, float]:
    """The numbers of an epoch record (what Tune and MLflow take as metrics)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_method(cfg: ExperimentConfig) -> Method:
    """The config's method, with its plugins imported first (every process that builds a pair
    builds its method here, so a plugin's models, tasks and methods exist wherever it runs)."""
    load_plugins(cfg.plugins)
    return METHODS.get(cfg.method.name, "method.name").fn(method_options(cfg), cfg)


@dataclass
class PairState:
    """Roles + method for one pair, and the training position."""

    cfg: ExperimentConfig
    method: Method
    roles: dict[str, Role]
    epoch: int = 0            # completed epochs
    step: int = 0             # completed optimisation steps
    history: list[dict] = field(default_factory=list)
    steps_per_epoch: int = 0  # the target's epoch (:meth:`steps_per_epoch_for`), fixed at build

    @classmethod
    def build(cls, cfg: ExperimentConfig, role_names: tuple[str, ...] | None = None,
              devices: dict[str, torch.device] | None = None, weightless: bool = False,
              steps_per_epoch: int | None = None) -> "PairState":
        """The method and its roles (``role_names``: only these), set up and ready to train.

        ``weightless``: fast validation (``mergenet_core.config.weightless``): the same build on
        :class:`~mergenet_core.training.roles.WeightlessRole` s (data probed, not loaded; models on the
        meta device) without optimisers, data streams or RNG streams; the method's ``setup``
        and ``ready`` run on the meta device, so they raise the errors of the full build.
        ``steps_per_epoch``: the pair's, when the caller knows it already (a Ray worker gets its
        plan's: a source-only worker then never loads the target's data)."""
        method = build_method(cfg)
        decl = method.roles(method.options)
        names = role_names or decl.needed
        if weightless:
            from ..models import weightless as on_meta

            roles = {n: build_weightless_role(n, cfg, load_init=n not in decl.untrained) for n in names}
            for r in roles.values():
                r.trainable = r.name in decl.trained
            spe = steps_per_epoch or cls.steps_per_epoch_for(cfg, roles)
            with on_meta():
                method.setup(roles)
                method.ready(roles, spe)
            return cls(cfg, method, roles, steps_per_epoch=spe)
        devices = devices or {}
        roles = {n: build_role(n, cfg, devices.get(n), load_init=n not in decl.untrained) for n in names}
        method.setup(roles)
        spe = steps_per_epoch or cls.steps_per_epoch_for(cfg, roles)
        for r in roles.values():
            r.init_training(spe)
            r.trainable = r.name in decl.trained
        method.ready(roles, spe)  # builds method-owned modules (mergenet: the adapters); ConfigError on bad sizes
        return cls(cfg, method, roles, steps_per_epoch=spe)

    @staticmethod
    def steps_per_epoch_for(cfg: ExperimentConfig, roles: dict[str, Role]) -> int:
        """An epoch is the target's epoch (its train split / batch size, capped by the recipe)."""
        if "target" in roles:
            return roles["target"].steps_per_epoch
        # a source-only host not told the number computes it without building the target
        from ..data import build_task

        t = cfg.target
        n = len(build_task(t.task.name, t.task.options, seed=cfg.seed).train) // t.recipe.batch_size
        return min(n, t.recipe.steps_per_epoch) if t.recipe.steps_per_epoch else n

    def evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, role in self.roles.items():
            if not role.trainable:
                continue
            with role.rng_scope():
                for k, v in role.take_epoch_stats().items():
                    out[f"{name}/{k}"] = v
                for split in ("val", "test"):
                    for k, v in role.evaluate(split).items():
                        out[f"{name}/{k}"] = v
        return out

    def role_state(self, name: str) -> dict:
        """One role's state plus the method's state kept with that role."""
        return {**self.roles[name].state_dict(), "method_role": self.method.state_dict(name)}

    def load_role_state(self, name: str, state: dict) -> None:
        self.roles[name].load_state_dict(state)
        self.method.load_state_dict(state.get("method_role", {}), name)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step,
                "roles": {n: self.role_state(n) for n in self.roles},
                "method": self.method.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict, method: bool = True) -> None:
        """Restore the position, the history and the roles hosted here; ``method``: also the
        method's shared state (a host whose exchange lives elsewhere restores it there)."""
        self.epoch, self.step = state["epoch"], state["step"]
        for n in self.roles:
            self.load_role_state(n, state["roles"][n])
        if method:
            self.method.load_state_dict(state["method"])
        self.history = list(state["history"])


def best_val(history: list[dict]) -> float | None:
    return max((r["target/val_acc"] for r in history if "target/val_acc" in r), default=None)


class Host(Protocol):
    """What :class:`PairLoop` needs from the process it runs in."""

    pair: PairState
    #: this process assembles the epoch record, tracks the best epoch and writes bundles
    lead: bool
    #: this process evaluates its roles and reports their numbers (one process per role)
    role_leader: bool

    def step(self, step: int) -> None:
        """Take optimisation step ``step`` for the roles hosted here."""

    def gather(self, local: dict) -> dict | None:
        """Merge this process's record parts with the other processes'; the lead gets the
        merged parts, the others ``None``."""

    def role_states(self) -> dict:
        """Every role's state (lead only; after :meth:`gather`)."""

    def on_record(self, record: dict) -> None:
        """The lead's epoch record, before any bundle of that epoch is written (log it here: a
        crash in between repeats the epoch on resume instead of losing its record)."""

    def save(self, bundle: dict, record: dict, best: bool) -> None:
        """Store a bundle (lead only)."""

    def end_epoch(self, record: dict | None, saved: bool, best: bool) -> None:
        """After each epoch, on every process (``record`` is ``None`` off the lead)."""


class PairLoop:
    """Train ``host.pair`` up to ``until_epoch`` (default: the recipe's epochs).

    ``outputs``: the run folder where the lead keeps ``metrics.jsonl`` (None: not written);
    ``on_step``: called after every step (progress bars)."""

    def __init__(self, host: Host, *, keep_bundles: str = "last_and_best", until_epoch: int | None = None,
                 outputs: RunOutputs | None = None, on_step: Callable[[], None] | None = None):
        if keep_bundles not in KEEP_BUNDLES:
            raise ConfigError("keep_bundles", f"'{short(keep_bundles)}' is not one of {', '.join(KEEP_BUNDLES)}")
        self.host, self.keep = host, keep_bundles
        self.epochs = host.pair.cfg.target.recipe.epochs
        self.end = min(self.epochs, until_epoch) if until_epoch is not None else self.epochs
        self.outputs, self.on_step = outputs, on_step

    def evaluates(self, epoch: int) -> bool:
        return epoch % self.host.pair.cfg.target.recipe.eval_every == 0 or epoch == self.epochs

    def bundle_due(self, epoch: int, new_best: bool) -> bool:
        return (epoch % self.host.pair.cfg.checkpoint_every == 0 or epoch == self.end
                or (new_best and self.keep != "last"))

    def run(self) -> dict[str, float]:
        """Train; returns the summary (:func:`summarise`) of the history so far."""
        host, pair = self.host, self.host.pair
        method, spe = pair.method, pair.steps_per_epoch
        best = best_val(pair.history)
        while pair.epoch < self.end:
            t0 = time.perf_counter()
            for _ in range(spe):
                host.step(pair.step)
                pair.step += 1
                if self.on_step is not None:
                    self.on_step()
            pair.epoch += 1
            train_s = time.perf_counter() - t0
            local = pair.evaluate() if host.role_leader and self.evaluates(pair.epoch) else {}
            numbers = method.role_metrics()  # taken on every process, reported by the role's leader
            if host.role_leader:
                local.update(numbers)
            parts = host.gather(local)
            record, saved, new_best = None, False, False
            if host.lead:
                record = {"epoch": pair.epoch, "step": pair.step, **parts, **method.epoch_metrics(),
                          "time/train_s": train_s, "time/epoch_s": time.perf_counter() - t0}
                pair.history.append(record)
                if self.outputs is not None:
                    self.outputs.history(pair.history)
                host.on_record(record)
                val = record.get("target/val_acc")
                new_best = val is not None and (best is None or val > best)
                best = val if new_best else best
                if self.bundle_due(pair.epoch, new_best):
                    host.save({"epoch": pair.epoch, "step": pair.step, "roles": host.role_states(),
                               "method": method.state_dict(), "history": pair.history}, record, new_best)
                    saved = True
            host.end_epoch(record, saved, new_best)
        return summarise(pair.history)
