"""Method registry: ``alone``, ``mergenet``, ``kd``, ``dml``, ``param_share``.

A new method is one module here that subclasses :class:`Method` and registers itself.
"""
from . import alone, dml, kd, mergenet, param_share  # noqa: F401  (registration)
from .base import METHODS, Method

__all__ = ["METHODS", "Method"]
