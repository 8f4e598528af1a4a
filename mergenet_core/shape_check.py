"""Fast validation of one pair config: the checks of the full pair build that file metadata and
shapes decide, in about a second and without Ray, MLflow or transformers.

``mergenet validate`` runs :func:`check_pair_shapes` on every pair (and every grid trial);
``mergenet validate --deep`` builds the whole pair instead (``orchestrator.pair.plan_pair``:
data loaded and decoded, models built with their weights, layers factorised, adapters
built). Both report the same first error for what this module can see:

* data present: each task's :func:`~mergenet_core.data.probe_task` (files there, headers /
  file counts for the split sizes and the number of classes; nothing decoded or tokenised);
* the models of the roles the method needs, built without weights
  (:func:`~mergenet_core.models.build_model_shapes`: meta device, no initialiser, no
  pretrained weights read -- only their presence checked), so names, shapes and module
  types are those of the real models;
* ``init_from``: the file's tensor names and shapes against the model's (memory-mapped);
* batch size against the train split;
* the method's own checks on the weightless models (:meth:`Method.check_shapes`: layer
  pair names, matrix / conv weights, ranks, adapter heads) and its warnings
  (:meth:`Method.config_warnings`);
* (the worker layout on Ray is the orchestrator's check: ``orchestrator.config.worker_layout``).

Not seen here (``--deep`` sees them): corrupt data past the file headers, a corrupt
pretrained-weights file, CIFAR folders with other than the official example counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ExperimentConfig
from .errors import ConfigError, MergenetError


@dataclass
class WeightlessRole:
    """What :meth:`Method.config_warnings` reads of a role: its name and (weightless) model."""

    name: str
    model: nn.Module


def role_model(name: str, cfg: ExperimentConfig, load_init: bool = True) -> nn.Module:
    """The weightless model of role ``name``, after the data, ``init_from`` and batch-size
    checks the full build makes for that role (``orchestrator.pair`` via ``roles.build_role``)."""
    from .data import probe_task
    from .models import MODELS, build_model_shapes

    spec = cfg.role(name)
    shape = probe_task(spec.task.name, spec.task.options)
    options = spec.model.options
    if not load_init and "pretrained" in MODELS.get(spec.model.name).options.model_fields:
        options = {**options, "pretrained": False}  # an untrained control role (as build_role)
    model = build_model_shapes(spec.model.name, options, shape.info)
    if spec.init_from is not None and load_init:
        from .init_weights import check_init

        check_init(model, spec.init_from, name, f"{name}.init_from")
    batch = spec.recipe.batch_size
    if batch < 1 or shape.train == 0 or batch > shape.train:  # data.stream.BatchStream (drop_last)
        raise ConfigError(f"{name}.recipe.batch_size",
                          f"{batch} does not fit a split of {shape.train} examples ({name} train split)")
    return model


def check_pair_shapes(cfg: ExperimentConfig, warnings: list[str] | None = None) -> list[str]:
    """``field: problem`` lines (the first problem, as the full build reports it) for a parsed
    pair config; the method's warnings go to ``warnings`` when there is no problem."""
    from .methods import METHODS

    try:
        entry = METHODS.get(cfg.method.name, "method.name")
        options = METHODS.options(cfg.method.name, cfg.method.options)
        method, decl = entry.fn(options, cfg), entry.fn.roles(options)
        models = {n: role_model(n, cfg, load_init=n not in decl.untrained) for n in decl.needed}
        lines = type(method).check_shapes(cfg, options, models)
        if lines:
            return lines
    except MergenetError as e:
        return [str(e)]
    if warnings is not None:
        warnings.extend(method.config_warnings({n: WeightlessRole(n, m) for n, m in models.items()}))
    return []
