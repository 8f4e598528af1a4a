"""Method registry: every module or package in this folder registers its method on import.

A new method is one module (``kd.py``) or one folder (``mergenet/``) here that subclasses
:class:`Method` and registers it (``METHODS.register("name")(cls)``); it is found and imported
by the loop below, so nothing else in the code base changes (docs/ARCHITECTURE.md).
"""
import importlib
import pkgutil

from .base import METHODS, Method, Note

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "Method", "Note"]
