"""Restricted unpickling of *data* files (the CIFAR python-pickle batches).

``pickle.load`` runs whatever callables a file names, so a crafted data folder can execute
commands (even under ``mergenet validate``). :func:`load_data_pickle` uses an
:class:`pickle.Unpickler` whose ``find_class`` admits only what a numpy data pickle needs:
plain containers (dict/list/tuple/str/bytes/numbers come from opcodes, never from globals;
``set``, ``frozenset``, ``bytearray`` and ``_codecs.encode`` for Python-3-written bytes) and
numpy arrays (``ndarray``, ``dtype``, the array/scalar reconstructors). Anything else ends
with :class:`~mergenet_core.errors.DataMissingError` naming the file and the refused global;
nothing from the file is called.

Checkpoints are not pickles read here: they go through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import DataMissingError

#: (module, name) pairs a data pickle may reference
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "bytearray"),  # Python 2 pickles
    ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
})


class RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(f"refused global {module[:60]}.{name[:60]}")


class DataUnpickler(pickle.Unpickler):
    """Admits plain containers and numpy arrays only (see :data:`ALLOWED`)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise RefusedGlobal(module, name)
        return super().find_class(module, name)


def load_data_pickle(path: str | Path, encoding: str = "bytes"):
    """Unpickle a data file with :class:`DataUnpickler`; every failure is one-line
    :class:`DataMissingError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return DataUnpickler(f, encoding=encoding).load()
    except Exception as e:  # noqa: BLE001 - one line naming the file, no traceback
        raise _data_error(path, e) from None


_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def scan_data_pickle(path: str | Path) -> None:
    """The check :func:`load_data_pickle` makes, without unpickling (fast validation): walk the
    file's opcodes (``pickletools.genops``; nothing is built or called) and refuse a file that
    references a global outside :data:`ALLOWED`, or that is not a complete pickle. Same
    one-line :class:`DataMissingError` as the loader. ``STACK_GLOBAL`` names are read from the
    strings pushed (or fetched from the memo) just before it: a file crafted to defeat that is
    still refused by the loader itself when the data are read."""
    import pickletools

    path = Path(path)
    recent: list = []  # the last two string values pushed
    memo: dict = {}
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                name = op.name
                if name == "GLOBAL" or name == "INST":
                    module, _, attr = str(arg).partition(" ")
                    if (module, attr) not in ALLOWED:
                        raise RefusedGlobal(module, attr)
                elif name == "STACK_GLOBAL":
                    module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else ("?", "?")
                    if (module, attr) not in ALLOWED:
                        raise RefusedGlobal(str(module), str(attr))
                if name in _STRING_OPS:
                    recent = (recent + [arg])[-2:]
                elif name in _GET_OPS:
                    recent = (recent + [memo.get(arg)])[-2:]
                elif name in _PUT_OPS or name == "MEMOIZE":  # stores the top of the stack
                    memo[arg if name in _PUT_OPS else len(memo)] = recent[-1] if recent else None
                elif name not in ("FRAME", "PROTO"):
                    recent = []
    except Exception as e:  # noqa: BLE001 - one line naming the file, no traceback
        raise _data_error(path, e) from None


def _data_error(path: Path, e: Exception) -> DataMissingError:
    """The one-line error for a data pickle that was refused or could not be read."""
    if isinstance(e, RefusedGlobal):
        return DataMissingError(f"{path}: refused to load: the pickle references {e.module[:60]}.{e.name[:60]}, "
                                "but a data file may hold only plain containers and numpy arrays")
    if isinstance(e, OSError):
        return DataMissingError(f"{path}: cannot read: {e.strerror or e}")
    return DataMissingError(f"{path}: not a readable data pickle ({type(e).__name__}: {str(e)[:80]})")
