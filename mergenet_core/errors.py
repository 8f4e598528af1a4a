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
