"""MergeNet (Li et al., AAAI 2025): learned parameter adapters rewrite target weights.

Everything MergeNet-specific lives in this folder:

* ``options.py``: the options model (layer pairs, adapter, transfer cycle, controls);
* ``links.py``: which role's weight feeds which (one adapter per link);
* ``adapter.py``: the low-rank parametric knowledge adapter (attention over factor tokens);
* ``hub.py``: every link's adapter with its optimiser and schedule;
* ``exchange.py``: the put / get / feedback protocol around the hub (sync or async);
* ``method.py``: the :class:`~mergenet_core.methods.base.Method` implementation.

The shared low-rank re-encoding of weights is ``mergenet_core/lowrank.py`` (``param_share``
uses it too).
"""
from ..base import METHODS
from .adapter import ParameterAdapter, adapter_param_count
from .exchange import Exchange
from .hub import AdapterHub
from .links import Link, exact_grad, make_links
from .method import MergeNet
from .options import AdapterOptions, LayerPair, MergeNetOptions

METHODS.register("mergenet")(MergeNet)

__all__ = ["MergeNet", "MergeNetOptions", "AdapterOptions", "LayerPair", "AdapterHub", "Exchange", "Link",
           "make_links", "exact_grad", "ParameterAdapter", "adapter_param_count"]
