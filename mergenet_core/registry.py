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
    """``check``: called with each new :class:`Entry`; raises ``ValueError`` for a bad one (a
    plugin's mistake surfaces where it registers, naming the entry)."""

    def __init__(self, kind: str, check: Callable[[Entry], None] | None = None):
        self.kind = kind
        self.check = check
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: type[BaseModel] | None = None, **meta: Any):
        """Decorator: register ``fn`` (a factory or a class) under ``name``. The options model
        is ``options``, else the class's own ``Options`` attribute, else :class:`NoOptions`."""
        def deco(fn):
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            entry = Entry(name, fn, options or getattr(fn, "Options", NoOptions), dict(meta))
            if not (isinstance(entry.options, type) and issubclass(entry.options, BaseModel)):
                raise ValueError(f"{self.kind} '{name}': options must be a pydantic model class, "
                                 f"not {entry.options!r}")
            if self.check is not None:
                self.check(entry)
            self._entries[name] = entry
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
