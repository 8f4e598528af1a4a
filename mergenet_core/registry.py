"""Name -> factory registries with pydantic option models (torchdistill/mergekit style).

A registry entry is a plain function plus an options model. Configs name an entry and
give its options as a mapping; :meth:`Registry.options` validates that mapping against the
entry's model, so option errors surface at config-validation time with a field path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from .errors import ConfigError


class NoOptions(BaseModel):
    """Options model for entries that take no options."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Entry:
    name: str
    fn: Callable[..., Any]
    options: type[BaseModel]
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: type[BaseModel] | None = None, **meta: Any):
        """Decorator: register ``fn`` (a factory or a class) under ``name``. The options model
        is ``options``, else the class's own ``Options`` attribute, else :class:`NoOptions`."""
        def deco(fn):
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = Entry(name, fn, options or getattr(fn, "Options", NoOptions), dict(meta))
            return fn

        return deco

    def get(self, name: str, field: str = "name") -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise ConfigError(field, f"unknown {self.kind} '{name}' (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def options(self, name: str, raw: Any, field: str = "options") -> BaseModel:
        """Validate ``raw`` against the entry's options model (raises pydantic's error)."""
        model = self.get(name).options
        if isinstance(raw, model):
            return raw
        return model.model_validate(raw or {})
