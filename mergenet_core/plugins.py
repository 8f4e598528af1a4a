"""Plugins: a user's own models, tasks, methods and modalities, registered without forking.

A plugin is a Python module that registers entries when it is imported
(``@MODELS.register(...)``, ``@TASKS.register(...)``, ``@METHODS.register(...)``,
``@modality.register``). Two ways in:

- a config's ``plugins:`` list: importable module names (``my_lab.models``) or ``.py`` files
  (a relative file is resolved against the config file that names it, when the config is read);
- installed packages' entry points in the group ``mergenet.plugins`` (``[project.entry-points.
  "mergenet.plugins"] my_lab = "my_lab.mergenet"``), loaded in every process.

:func:`load_plugins` imports each once per process. Every process that validates or builds a pair
calls it with the config's list (config validation, :class:`~mergenet_core.training.loop.PairState`,
the orchestrator's trials, Train workers and adapter actor), so a plugin's entries exist wherever
the pair is. A plugin that fails to import, or registers a bad entry, is one
:class:`~mergenet_core.errors.ConfigError` line naming the plugin.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, MergenetError, short

ENTRY_POINT_GROUP = "mergenet.plugins"

_loaded: dict[str, object] = {}
_entry_points_done = False


def load_plugins(specs: Iterable[str] = ()) -> None:
    """Import the installed entry points (first call only) and each of ``specs`` not yet
    imported in this process; raises :class:`ConfigError` (field ``plugins``) naming the plugin."""
    _load_entry_points()
    for spec in specs:
        if spec not in _loaded:
            _loaded[spec] = _guarded(f"plugin '{short(spec, 120)}'", lambda s=spec: _import(s))


def loaded() -> list[str]:
    """The plugins imported in this process, entry points as ``entry point NAME``, in order."""
    return list(_loaded)


def _load_entry_points() -> None:
    global _entry_points_done
    if _entry_points_done:
        return
    _entry_points_done = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry point {ep.name}"
        if key not in _loaded:
            _loaded[key] = _guarded(f"plugin entry point '{ep.name}' ({ep.value})", ep.load)


def _guarded(what: str, load):
    from .models.vision import import_torchvision

    import_torchvision(required=False)  # a plugin may import torchvision or transformers (models/vision.py)
    try:
        return load()
    except MergenetError as e:
        raise ConfigError("plugins", f"{what}: {e}") from None
    except Exception as e:  # an import error, a bad registration (ValueError), a bug in the plugin
        raise ConfigError("plugins", f"{what} failed to load: {type(e).__name__}: {short(str(e), 200)}") from None


def _import(spec: str):
    if not spec.endswith(".py"):
        return importlib.import_module(spec)
    path = Path(spec).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    # one module name per file, stable across processes (objects defined there pickle by it)
    name = f"mergenet_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
