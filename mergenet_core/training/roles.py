"""A *role* is one model training on its own task: model, data stream, optimiser, schedule, RNG.

The single-process engine holds two roles (source, target) and steps them in lockstep; a Ray
Train worker holds one. Both step them with the same :func:`~mergenet_core.training.step.take_step`,
:class:`Role` methods and :class:`~mergenet_core.methods.base.Method` code, so there is one
training loop.

Each role owns its RNG streams (global torch RNG for dropout, a generator for augmentation),
swapped in with :meth:`Role.rng_scope`, so results do not depend on whether the two roles
share a process.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import ExperimentConfig, Recipe, RoleSpec
from ..data import BatchStream, Modality, TaskData, build_task, get_modality
from ..errors import ConfigError
from ..models import build_model
from .optim import RngStream, param_groups, reapply_hparams, schedule_lambda

def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any printable parts (no Python ``hash`` randomisation)."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("device", "cuda requested but no CUDA device is available")
    return torch.device(name)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """No weight decay on biases and normalisation weights (1-D tensors)."""
    o = recipe.optimizer
    groups = param_groups(model.parameters(), o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr)


def lr_lambda(recipe: Recipe, steps_per_epoch: int):
    """Per-step multiplier for LambdaLR: linear warm-up, then constant / multistep / cosine."""
    s = recipe.schedule
    return schedule_lambda(s.name, recipe.epochs * steps_per_epoch, int(s.warmup_epochs * steps_per_epoch),
                           [m * steps_per_epoch for m in s.milestones], s.gamma)


@dataclass
class Role:
    name: str
    spec: RoleSpec
    task: TaskData
    model: nn.Module
    device: torch.device
    seed: int
    precision: str = "fp32"
    channels_last: bool = False
    trainable: bool = True
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    stream: BatchStream | None = None
    rng: RngStream | None = None  # the role's own global-RNG stream (dropout)
    aug: torch.Generator | None = None
    #: data parallelism inside the role (Ray topology): this worker's (index, count) of each
    #: global batch, and a callable that averages gradients across the role's workers
    shard: tuple[int, int] | None = None
    grad_sync: Callable[[nn.Module], None] | None = None
    stats: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "n": 0, "steps": 0})

    @property
    def recipe(self) -> Recipe:
        assert self.spec.recipe is not None
        return self.spec.recipe

    @property
    def steps_per_epoch(self) -> int:
        spe = self.stream.steps_per_epoch
        cap = self.recipe.steps_per_epoch
        return min(spe, cap) if cap else spe

    @property
    def modality(self) -> Modality:
        """How this role's batches reach its model (data/modality.py)."""
        return get_modality(self.task.info.modality)

    # ------------------------------------------------------------------ set-up
    def init_training(self, steps_per_epoch: int | None = None) -> None:
        """Build optimiser and schedule. Call after a method has changed the model's layers."""
        self.model.to(self.device)
        self.modality.prepare_model(self.model, self.channels_last)
        self.optimizer = build_optimizer(self.model, self.recipe)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.recipe, steps_per_epoch or self.steps_per_epoch))

    def rng_scope(self):
        """Run with this role's own global-RNG stream (dropout etc.), then restore the caller's."""
        return self.rng.scope()

    def autocast(self):
        on = self.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    # ------------------------------------------------------------------ steps
    def next_batch(self):
        x, y = self.stream.next()
        if self.shard is not None:
            i, k = self.shard
            idx = torch.arange(i, len(y), k)
            x = {n: v[idx] for n, v in x.items()} if isinstance(x, dict) else x[idx]
            y = y[idx]
        x = self.modality.prepare(x, self.task.info, self.device, train=self.recipe.augment, generator=self.aug,
                                  channels_last=self.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def loss(self, x, y, params: dict | None = None):
        """Forward + the modality's loss (cross-entropy on class logits); ``params`` overrides
        parameters via ``functional_call``."""
        with self.autocast():
            if params:
                logits = torch.func.functional_call(self.model, params, (x,), strict=False)
            else:
                logits = self.model(x)
            loss = self.modality.loss(logits.float(), y, self.recipe.label_smoothing)
        return loss, logits.float()

    def record(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one step's loss and hits to the epoch's sums, kept on the role's device (float64
        / int64: the same sums as Python floats, in the same order) so that a step never waits
        for the device; they become numbers in :meth:`take_epoch_stats` / :meth:`state_dict`."""
        n = len(y)
        self.stats["loss"] = self.stats["loss"] + loss.detach().double() * n
        self.stats["correct"] = self.stats["correct"] + self.modality.hits(logits, y)
        self.stats["n"] += n
        self.stats["steps"] += 1

    def _stats_numbers(self) -> dict:
        s = self.stats
        return {**s, "loss": float(s["loss"]), "correct": int(s["correct"])}

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.model)

    def apply_step(self) -> None:
        if self.recipe.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def take_epoch_stats(self) -> dict[str, float]:
        s = self._stats_numbers()
        n = max(1, s["n"])
        out = {"train_loss": s["loss"] / n, "train_acc": s["correct"] / n} if s["n"] else {}
        self.stats = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0}
        return out

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """``{split}_{name}`` for each of the modality's ``metric_names`` (``loss``, ``acc``;
        retrieval adds its recalls)."""
        self.model.eval()
        return {f"{split}_{k}": v for k, v in self.modality.evaluate(self, getattr(self.task, split)).items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            **self.rng.state_dict(),
            "aug": self.aug.get_state(),
            # train loss/accuracy accumulated since the last evaluation (eval_every > 1)
            "stats": self._stats_numbers(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.rng.load_state_dict(state)
        self.aug.set_state(state["aug"])
        if "stats" in state:
            self.stats = dict(state["stats"])
        self.apply_hparams()

    def apply_hparams(self) -> None:
        """Make the optimiser follow the recipe's lr and weight decay again after a state load
        (a PBT exploit or an edited config may change them; the schedule position is kept)."""
        o = self.recipe.optimizer
        reapply_hparams(self.optimizer, self.scheduler, o.lr, o.weight_decay)


def _matches(param: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    return param == pattern or param.startswith(pattern + ".") or fnmatchcase(param, pattern)


def apply_train_only(model: nn.Module, patterns: list[str] | None, role: str) -> None:
    """``RoleSpec.train``: freeze every parameter none of ``patterns`` names (a name, a module
    prefix, or an ``fnmatch`` pattern; a parameter the model froze itself stays frozen); a
    pattern that names no parameter is a ConfigError at ``{role}.train.{i}``."""
    if patterns is None:
        return
    names = [n for n, _ in model.named_parameters()]
    for i, pat in enumerate(patterns):
        if not any(_matches(n, pat) for n in names):
            from ..errors import short

            raise ConfigError(f"{role}.train.{i}", f"'{short(pat)}' names no parameter of the {role} model "
                                                  f"(e.g. {', '.join(names[:2])}, ...; mergenet pairs lists them)")
    for n, p in model.named_parameters():  # only freezes: what the model froze itself stays frozen
        if not any(_matches(n, pat) for pat in patterns):
            p.requires_grad_(False)


def _build(name: str, builder, model: str, options, info):
    """A role's model; its errors name the role's field (``target.model.options.image.name``)."""
    try:
        return builder(model, options, info)
    except ConfigError as e:
        if e.field.startswith("model."):
            raise ConfigError(f"{name}.{e.field}", e.problem) from None
        raise


def build_role(name: str, cfg: ExperimentConfig, device: torch.device | None = None,
               load_init: bool = True) -> Role:
    """Load the role's task and build its model, seeded per (experiment seed, role); then load
    ``init_from`` weights unless ``load_init`` is false (a control arm's untrained role, which
    is also built without pretrained weights where the model has a ``pretrained`` option)."""
    spec = cfg.role(name)
    device = device or resolve_device(cfg.device)
    task = build_task(spec.task.name, spec.task.options, seed=cfg.seed)
    torch.manual_seed(derive_seed(cfg.seed, name, "init"))
    options = spec.model.options
    if not load_init:
        from ..models import MODELS

        if "pretrained" in MODELS.get(spec.model.name).options.model_fields:
            options = {**options, "pretrained": False}  # untrained: no downloaded/packaged weights either
    model = _build(name, build_model, spec.model.name, options, task.info)
    if spec.init_from is not None and load_init:
        from ..io.init_weights import apply_init

        apply_init(model, spec.init_from, name, f"{name}.init_from")
    apply_train_only(model, spec.train, name)
    try:
        stream = BatchStream(task.train, spec.recipe.batch_size, seed=derive_seed(cfg.seed, name, "data"))
    except ConfigError as e:  # name the role's field, not a bare "batch_size"
        raise ConfigError(f"{name}.recipe.{e.field}", f"{e.problem} ({name} train split)") from None
    aug = torch.Generator(device=device)
    aug.manual_seed(derive_seed(cfg.seed, name, "augment"))
    rng = RngStream(derive_seed(cfg.seed, name, "dropout"), device)
    return Role(name=name, spec=spec, task=task, model=model, device=device, seed=cfg.seed,
                precision=cfg.precision, channels_last=cfg.channels_last, stream=stream, aug=aug, rng=rng)


@dataclass
class WeightlessRole:
    """A role as fast validation builds it (:func:`build_weightless_role`): its model without
    weights (meta device) and the steps per epoch of its train split; no data, optimiser or
    RNG streams. What a method's ``setup``, ``ready`` and ``config_warnings`` read of a role."""

    name: str
    model: nn.Module
    #: ``Role.steps_per_epoch`` of the full build: train split // batch size, capped by the recipe
    steps_per_epoch: int
    device: torch.device = field(default_factory=lambda: torch.device("meta"))
    trainable: bool = True


def build_weightless_role(name: str, cfg: ExperimentConfig, load_init: bool = True) -> WeightlessRole:
    """:func:`build_role` without data or weights, making its checks in its order: the task's
    files (:func:`~mergenet_core.data.probe_task`: metadata only, nothing decoded), the model
    (:func:`~mergenet_core.models.build_model_shapes`: meta device), ``init_from`` (names and
    shapes, memory-mapped) and the batch size against the train split."""
    from ..data import probe_task
    from ..models import MODELS, build_model_shapes

    spec = cfg.role(name)
    shape = probe_task(spec.task.name, spec.task.options)
    options = spec.model.options
    if not load_init and "pretrained" in MODELS.get(spec.model.name).options.model_fields:
        options = {**options, "pretrained": False}  # an untrained control role (as build_role)
    model = _build(name, build_model_shapes, spec.model.name, options, shape.info)
    if spec.init_from is not None and load_init:
        from ..io.init_weights import check_init

        check_init(model, spec.init_from, name, f"{name}.init_from")
    apply_train_only(model, spec.train, name)
    batch, cap = spec.recipe.batch_size, spec.recipe.steps_per_epoch
    if batch < 1 or shape.train == 0 or batch > shape.train:  # data.stream.BatchStream (drop_last)
        raise ConfigError(f"{name}.recipe.batch_size",
                          f"{batch} does not fit a split of {shape.train} examples ({name} train split)")
    spe = shape.train // batch
    return WeightlessRole(name, model, min(spe, cap) if cap else spe)
