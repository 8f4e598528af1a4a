"""Fast validation of one pair config: the full pair build on weightless models, in about a
second and without Ray, MLflow or transformers.

``mergenet validate`` runs :func:`check_pair_shapes` on every pair (and every grid trial);
``mergenet validate --deep`` builds the whole pair instead (``orchestrator.topology.split.plan.plan_pair``:
data loaded and decoded, models built with their weights, layers factorised, adapters
built). The fast check is the same build, :meth:`~mergenet_core.training.loop.PairState.build` with
``weightless=True``, so the two report the same first error by construction for what it can see:

* data present: each task's :func:`~mergenet_core.data.probe_task` (files there, headers /
  file counts for the split sizes and the number of classes; nothing decoded or tokenised);
* the models of the roles the method needs, built without weights
  (:func:`~mergenet_core.models.build_model_shapes`: meta device, no initialiser, no
  pretrained weights read -- only their presence checked), so names, shapes and module
  types are those of the real models;
* ``init_from``: the file's tensor names and shapes against the model's (memory-mapped);
* batch size against the train split (and the steps per epoch from the split sizes);
* the method's own :meth:`~mergenet_core.methods.base.Method.setup` and
  :meth:`~mergenet_core.methods.base.Method.ready` on those models, on the meta device (layer
  pair names, matrix / conv weights, ranks, factorised layers, adapters), and its warnings
  (:meth:`~mergenet_core.methods.base.Method.config_warnings`);
* (the worker layout on Ray is the orchestrator's check: ``orchestrator.config.worker_layout``).

Not seen here (``--deep`` sees them): corrupt data past the file headers, a corrupt
pretrained-weights file, CIFAR folders with other than the official example counts, an
unavailable ``device``.
"""
from __future__ import annotations

from . import ExperimentConfig
from ..errors import MergenetError


def check_pair_shapes(cfg: ExperimentConfig, warnings: list[str] | None = None) -> list[str]:
    """``field: problem`` lines (the first problem, as the full build reports it) for a parsed
    pair config; the method's warnings go to ``warnings`` when there is no problem."""
    from ..training.loop import PairState

    try:
        pair = PairState.build(cfg, weightless=True)
    except MergenetError as e:
        return [str(e)]
    if warnings is not None:
        warnings.extend(pair.method.config_warnings(pair.roles))
    return []
