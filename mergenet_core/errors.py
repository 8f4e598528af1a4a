"""Errors that carry a one-line, user-facing message.

The CLI turns these into exit code 2 and a single line on stderr (no traceback).
"""
from __future__ import annotations


class MergenetError(Exception):
    """Base class for errors the user can fix."""


class ConfigError(MergenetError):
    """A configuration is invalid. ``field`` is the dotted path of the culprit."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class DataMissingError(MergenetError):
    """A data set or weight package is not installed / a path does not exist."""


class TransferError(MergenetError):
    """A MergeNet transfer failed repeatedly (e.g. persistent NaN/Inf)."""


def short(value: object, limit: int = 60) -> str:
    """``str(value)`` cut to ``limit`` characters (``...`` marks the cut), on one line: what an
    error line may echo of a user's value."""
    text = value if isinstance(value, str) else _bounded_repr(value, limit)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def _bounded_repr(value: object, limit: int) -> str:
    """repr of a value without ever building more than ``limit`` characters of it (a deeply
    shared structure can expand to gigabytes)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 4, 4, 4, 4
    r.maxstring = r.maxother = max(8, limit)
    return r.repr(value)
