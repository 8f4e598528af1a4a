"""Single-process engine: one or two roles trained in lockstep by a method.

Per epoch (= the target's steps per epoch) it evaluates every trained role on val and test,
appends one JSON line to ``metrics.jsonl``, and writes a checkpoint bundle (models,
optimisers, schedulers, data positions, RNG streams, method state). ``resume=True``
continues from the last bundle exactly: 2 epochs straight equal 1 + resume + 1.

The Ray pair workers (``orchestrator.pair``) drive the same :class:`PairState` pieces.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import ExperimentConfig, method_options
from .errors import ConfigError, short
from .methods import METHODS, Method
from .roles import Role, build_role, resolve_device
from .safe_io import load_checkpoint, restore_into, save_checkpoint, write_atomic

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL = "final.json"
BEST = "best.pt"  # the bundle of the best-validation epoch (Engine(keep_best=True))


def save_bundle(path: Path, state: dict) -> None:
    """Atomic ``torch.save`` (a unique temp file, fsync, rename; removed on failure)."""
    save_checkpoint(path, state)


def load_bundle(path: Path) -> dict:
    """``torch.load(weights_only=True)``; a bad file is one :class:`MergenetError` line."""
    return load_checkpoint(path)


def build_method(cfg: ExperimentConfig) -> Method:
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

    @classmethod
    def build(cls, cfg: ExperimentConfig, role_names: tuple[str, ...] | None = None,
              devices: dict[str, torch.device] | None = None) -> "PairState":
        method = build_method(cfg)
        names = role_names or method.roles_needed()
        devices = devices or {}
        untrained = method.untrained_roles()
        roles = {n: build_role(n, cfg, devices.get(n), load_init=n not in untrained) for n in names}
        method.setup(roles)
        spe = cls.steps_per_epoch_for(cfg, roles)
        for r in roles.values():
            r.init_training(spe)
            r.trainable = r.name in method.trained_roles()
        try:
            method.ready(roles, spe)  # builds the adapters (mergenet): sizes from the paired weights
        except ValueError as e:  # e.g. more heads than the adapter's width allows
            field = "method.options.adapter.heads" if "heads" in str(e) else "method.options"
            raise ConfigError(field, short(str(e), 160)) from None
        return cls(cfg, method, roles)

    @staticmethod
    def steps_per_epoch_for(cfg: ExperimentConfig, roles: dict[str, Role]) -> int:
        """An epoch is the target's epoch (its train split / batch size, capped by the recipe)."""
        if "target" in roles:
            return roles["target"].steps_per_epoch
        # a source-only worker (Ray topology) computes the same number without the target's data
        from .data import build_task

        t = cfg.target
        n = len(build_task(t.task.name, t.task.options, seed=cfg.seed).train) // t.recipe.batch_size
        return min(n, t.recipe.steps_per_epoch) if t.recipe.steps_per_epoch else n

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_per_epoch_for(self.cfg, self.roles)

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
        return {**self.roles[name].state_dict(), "method_role": self.method.role_state_dict(name)}

    def load_role_state(self, name: str, state: dict) -> None:
        self.roles[name].load_state_dict(state)
        self.method.load_role_state_dict(name, state.get("method_role", {}))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step,
                "roles": {n: self.role_state(n) for n in self.roles},
                "method": self.method.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        for n in self.roles:
            self.load_role_state(n, state["roles"][n])
        self.method.load_state_dict(state["method"])
        self.history = list(state["history"])


def summarise(history: list[dict]) -> dict[str, float]:
    """Final-epoch and best-validation-epoch figures for every role (never best-on-test)."""
    if not history:
        return {}
    last = history[-1]
    out = {"epochs": last["epoch"], "steps": last["step"]}
    for role in ("source", "target"):
        if f"{role}/val_acc" not in last:
            continue
        best = max(history, key=lambda r: (r[f"{role}/val_acc"], -r["epoch"]))
        out.update({
            f"{role}/final_test_acc": last[f"{role}/test_acc"],
            f"{role}/final_val_acc": last[f"{role}/val_acc"],
            f"{role}/best_val_acc": best[f"{role}/val_acc"],
            f"{role}/best_val_epoch": best["epoch"],
            f"{role}/test_acc_at_best_val": best[f"{role}/test_acc"],
        })
    out["wall_s"] = sum(r.get("time/epoch_s", 0.0) for r in history)
    return out


class Engine:
    """Train one pair in this process. ``on_epoch(record)`` lets callers log each epoch."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_checkpoint: Callable[[Path, dict], None] | None = None, keep_best: bool = False):
        """``on_checkpoint(path, record)`` runs after each bundle write (``checkpoint.pt``, and
        ``best.pt`` with ``keep_best``: the bundle of the best-validation epoch so far)."""
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.on_epoch = on_epoch
        self.on_checkpoint = on_checkpoint
        self.keep_best = keep_best
        self.device = resolve_device(cfg.device)
        self.pair = PairState.build(cfg, devices={n: self.device for n in ("source", "target")})

    def run(self, resume: bool = False, stop_after_epochs: int | None = None,
            until_epoch: int | None = None) -> dict[str, float]:
        """Train to the configured number of epochs (or ``stop_after_epochs`` more, or up to
        epoch ``until_epoch``)."""
        pair, cfg = self.pair, self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.out / CHECKPOINT
        if not resume:
            (self.out / FINAL).unlink(missing_ok=True)  # never leave a previous run's summary
        if resume and ckpt.exists():
            restore_into(ckpt, pair.load_state_dict, load_bundle(ckpt))
        write_atomic(self.out / "config.json", cfg.model_dump_json(indent=2))
        self._rewrite_metrics(pair.history)
        spe = pair.steps_per_epoch
        epochs = cfg.target.recipe.epochs
        end = epochs if stop_after_epochs is None else min(epochs, pair.epoch + stop_after_epochs)
        if until_epoch is not None:
            end = min(end, until_epoch)
        bar = _progress(total=(end - pair.epoch) * spe, enabled=self.progress, desc=cfg.name)
        while pair.epoch < end:
            t0 = time.perf_counter()
            for _ in range(spe):
                pair.method.pair_step(pair.step, pair.roles)
                pair.step += 1
                bar.update(1)
            pair.epoch += 1
            train_s = time.perf_counter() - t0
            record = {"epoch": pair.epoch, "step": pair.step}
            if pair.epoch % cfg.target.recipe.eval_every == 0 or pair.epoch == epochs:
                record.update(pair.evaluate())
            record.update(pair.method.role_metrics())
            record.update(pair.method.epoch_metrics())
            record["time/train_s"] = train_s
            record["time/epoch_s"] = time.perf_counter() - t0
            pair.history.append(record)
            self._rewrite_metrics(pair.history)
            if self.on_epoch:
                self.on_epoch(record)
            bar.set_postfix({k.split("/")[-1]: round(v, 4) for k, v in record.items() if k == "target/val_acc"})
            val = record.get("target/val_acc")
            best = self.keep_best and val is not None and val > max(
                (r["target/val_acc"] for r in pair.history[:-1] if "target/val_acc" in r), default=-1.0)
            if pair.epoch % cfg.checkpoint_every == 0 or pair.epoch == end or best:
                state = pair.state_dict()
                if best:  # first: a crash in between never leaves a history whose best bundle is older
                    save_bundle(self.out / BEST, state)
                save_bundle(ckpt, state)
                if self.on_checkpoint:
                    self.on_checkpoint(ckpt, record)
        bar.close()
        final = summarise([r for r in pair.history if "target/val_acc" in r])
        write_atomic(self.out / FINAL, json.dumps(final, indent=2))
        return final

    def _rewrite_metrics(self, history: list[dict]) -> None:
        """metrics.jsonl mirrors the checkpointed history (drops epochs lost in a crash)."""
        write_atomic(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in history))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, leave=False)
