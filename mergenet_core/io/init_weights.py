"""Start a role from trained weights (``source.init_from`` / ``target.init_from``).

Accepted: a ``mergenet train`` output folder (its ``checkpoint.pt``, or the Ray pair's
``pair.pt``), one of those bundle files, or a plain ``state_dict`` file; a local path or a
bucket URI (``s3://``, ``gs://``, ... read through ``pyarrow.fs``). Everything is loaded with
``torch.load(weights_only=True)``. Every problem is a :class:`ConfigError` naming the field
and, for shape or name mismatches, the first mismatching parameter -- raised while the role
is built, before any training.
"""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import InitFrom
from ..errors import ConfigError

BUNDLE_NAMES = ("checkpoint.pt", "pair.pt")

#: ``init_from`` folders that will hold trained weights before any training starts but do not
#: yet (a grid's ``sources:``, trained by ``mergenet run`` after validation): folder ->
#: ``(name, build)``, ``build()`` returning the weightless model the weights will be saved from.
#: Fast validation checks such an ``init_from`` against that model's names and shapes.
PLANNED: dict[str, tuple[str, object]] = {}
_VALIDATING: list[bool] = []


class validating:
    """While active, :func:`apply_init` checks a :data:`PLANNED` folder against its planned
    shapes and loads nothing (a deep validation before the sources exist); outside it, a planned
    folder is an error, so no training run can start silently from an untrained model."""

    def __enter__(self):
        _VALIDATING.append(True)
        return self

    def __exit__(self, *exc):
        _VALIDATING.pop()
        return False


def _planned_check(model: nn.Module, spec: InitFrom, field: str) -> bool:
    """True when ``spec`` names a planned, not yet trained folder (checked against its shapes)."""
    planned = PLANNED.get(spec.path)
    if planned is None:
        return False
    name, build = planned
    check_init_state(model, build().state_dict(), f"source '{name}' (trained before the grid)", field)
    return True


def _read_bytes(path: str, field: str) -> tuple[str, bytes]:
    """``(file actually read, its bytes)``; a folder means its bundle file."""
    if "://" in path:
        try:
            from pyarrow import fs as pafs

            filesystem, inner = pafs.FileSystem.from_uri(path)
            info = filesystem.get_file_info(inner)
            if info.type == pafs.FileType.Directory:
                for name in BUNDLE_NAMES:
                    cand = f"{inner.rstrip('/')}/{name}"
                    if filesystem.get_file_info(cand).type == pafs.FileType.File:
                        inner, path = cand, f"{path.rstrip('/')}/{name}"
                        break
                else:
                    raise ConfigError(field, f"{path}: folder holds no {' or '.join(BUNDLE_NAMES)}")
            elif info.type != pafs.FileType.File:
                raise ConfigError(field, f"{path}: no such file or folder")
            with filesystem.open_input_file(inner) as f:
                return path, f.read()
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any storage error is the user's to fix
            raise ConfigError(field, f"{path}: cannot read ({type(e).__name__}: {str(e)[:160]})") from None
    p = Path(path)
    if p.is_dir():
        found = next((p / n for n in BUNDLE_NAMES if (p / n).is_file()), None)
        if found is None:
            raise ConfigError(field, f"{p}: folder holds no {' or '.join(BUNDLE_NAMES)}")
        p = found
    if not p.is_file():
        raise ConfigError(field, f"{p}: no such file or folder")
    try:
        return str(p), p.read_bytes()
    except OSError as e:
        raise ConfigError(field, f"{p}: cannot read ({e.strerror})") from None


def load_init_state(spec: InitFrom, role: str, field: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``(file, model state_dict)`` named by ``spec`` for the role ``role``."""
    where, raw = _read_bytes(spec.path, f"{field}.path" if spec.role else field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle-protocol notes of the weights-only unpickler
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(field, f"{where}: refused by the weights-only loader (corrupt, or it holds objects "
                                 "that could run code when loaded)") from None
    except Exception as e:  # noqa: BLE001 - truncated / corrupt / not a torch file
        raise ConfigError(field, f"{where}: not a readable checkpoint ({type(e).__name__})") from None
    obj = _model_state(obj, spec, role, field, where)
    if obj is None:
        raise ConfigError(field, f"{where}: neither a mergenet bundle nor a state_dict of tensors")
    return where, obj


def _model_state(obj, spec: InitFrom, role: str, field: str, where: str) -> dict | None:
    """The model ``state_dict`` in a loaded file: a pair bundle's role (``spec.role``, else the
    only one, else ``role``), a role state's ``model``, or a plain ``state_dict``; ``None`` when
    the file holds none of these."""
    if isinstance(obj, dict) and isinstance(obj.get("roles"), dict):  # a pair bundle
        roles = obj["roles"]
        name = spec.role or (next(iter(roles)) if len(roles) == 1 else role)
        if name not in roles:
            raise ConfigError(field, f"{where}: the bundle has no role '{name}' (it has: {', '.join(roles)})")
        obj = roles[name]
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # one role's state
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    return obj


def apply_init(model: nn.Module, spec: InitFrom, role: str, field: str) -> None:
    """Load the weights named by ``spec`` into ``model`` (strict: same names and shapes).

    A :data:`PLANNED` folder that holds no weights yet (validation of a grid before its
    ``sources:`` are trained) is checked against the planned model's shapes and loads nothing."""
    if spec.path in PLANNED:
        if _VALIDATING:
            _planned_check(model, spec, field)
            return
        raise ConfigError(field, f"source '{PLANNED[spec.path][0]}' is not trained yet (`mergenet run` trains a "
                                 "grid's sources before its trials)")
    where, state = load_init_state(spec, role, field)
    check_init_state(model, state, where, field)
    model.load_state_dict(state)


def check_init_state(model: nn.Module, state: dict, where: str, field: str) -> None:
    """Raise :class:`ConfigError` unless ``state`` has exactly ``model``'s state_dict names and
    shapes (only shapes are compared: ``model`` may live on the meta device)."""
    own = model.state_dict()
    for name, t in own.items():
        base = name.rpartition(".")[0]
        if name not in state and f"{base}.A" in state and f"{base}.B" in state:
            raise ConfigError(field, f"{where}: layer '{base}' is stored factorised (A, B of a mergenet "
                                     "'learned' layer pair), not as the dense weight this model has; start "
                                     "from a run without learned-mode pairs on that role, or a plain state_dict")
        if name not in state:
            raise ConfigError(field, f"{where}: parameter '{name}' of the model is missing from the file "
                                     "(a different model?)")
        if tuple(state[name].shape) != tuple(t.shape):
            raise ConfigError(field, f"{where}: parameter '{name}' has shape {tuple(state[name].shape)} in "
                                     f"the file but {tuple(t.shape)} in the model")
    extra = next((n for n in state if n not in own), None)
    if extra is not None:
        raise ConfigError(field, f"{where}: parameter '{extra}' in the file does not exist in the model "
                                 "(a different model?)")


def check_init(model: nn.Module, spec: InitFrom, role: str, field: str) -> None:
    """Fast validation of ``init_from`` against a (weightless) ``model``: the same errors as
    :func:`apply_init`. A local file in torch's zip format is opened memory-mapped (its
    tensors are not read, only the weights-only unpickler's record of them); anything else
    (a bucket URI, an old-format or unreadable file) goes through :func:`load_init_state`,
    so its error lines are the full build's."""
    if _planned_check(model, spec, field):  # fast validation only: nothing is loaded here
        return
    where, state = _load_mapped(spec, role, field)
    if state is None:
        where, state = load_init_state(spec, role, field)
    check_init_state(model, state, where, field)


def _load_mapped(spec: InitFrom, role: str, field: str) -> tuple[str, dict | None]:
    if "://" in spec.path:
        return spec.path, None
    p = Path(spec.path)
    if p.is_dir():
        p = next((p / n for n in BUNDLE_NAMES if (p / n).is_file()), p)
    if not p.is_file():
        return str(p), None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the full loader names the problem
        return str(p), None
    return str(p), _model_state(obj, spec, role, field, str(p))
