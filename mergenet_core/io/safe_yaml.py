"""Bounded YAML: safe loading (the C loader where libyaml is installed) with limits.

A config is small. Before anything is built, :func:`load_yaml_text` checks, on the parser's
event stream (no objects built yet):

* size: at most :data:`MAX_BYTES` bytes of UTF-8 (undecodable bytes are an error);
* nesting: at most :data:`MAX_DEPTH` levels of mappings/sequences;
* expansion: at most :data:`MAX_NODES` nodes *after* aliases are expanded, so an alias bomb
  ("billion laughs", a few hundred bytes that expand to billions of nodes) is refused before
  any consumer (a deep copy, an error line, a JSON dump) could expand it.

Every problem is a :class:`~mergenet_core.errors.ConfigError` whose message names the file
and never echoes more than a short prefix of the input.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import ConfigError, short

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  #: the C loader where installed
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

MAX_BYTES = 1 << 20      # 1 MiB: our largest grid is ~2 KiB
MAX_DEPTH = 32
MAX_NODES = 100_000      # scalars + collections after alias expansion


def _where(name: str) -> str:
    return f"{name}: " if name else ""


def check_events(text: str, name: str = "") -> None:
    """Depth and expanded-size limits, on the event stream (linear time, bounded memory)."""
    stack: list[int] = []        # nodes counted inside each open collection
    anchors: dict[str, int] = {}  # anchor -> expanded node count of the anchored node
    open_anchor: list[str | None] = []
    total = 0

    def add(n: int) -> None:
        nonlocal total
        if stack:
            stack[-1] += n
        else:
            total += n
        if (stack[-1] if stack else total) > MAX_NODES or total > MAX_NODES:
            raise ConfigError("", f"{_where(name)}YAML expands to more than {MAX_NODES:,} nodes "
                                  "(an alias bomb?): refused")

    try:
        for ev in yaml.parse(text, Loader=Loader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append(1)
                open_anchor.append(ev.anchor)
                if len(stack) > MAX_DEPTH:
                    line = f" (line {ev.start_mark.line + 1})" if ev.start_mark else ""
                    raise ConfigError("", f"{_where(name)}YAML nested deeper than {MAX_DEPTH} levels{line}")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                n, anchor = stack.pop(), open_anchor.pop()
                if anchor is not None:
                    anchors[anchor] = n
                add(n)
            elif isinstance(ev, yaml.ScalarEvent):
                if ev.anchor is not None:
                    anchors[ev.anchor] = 1
                add(1)
            elif isinstance(ev, yaml.AliasEvent):
                add(anchors.get(ev.anchor, 1))
            # stream/document events: nothing to count
            if total > MAX_NODES:
                raise ConfigError("", f"{_where(name)}YAML expands to more than {MAX_NODES:,} nodes: refused")
    except yaml.YAMLError as e:
        raise _yaml_error(e, name) from None


def _yaml_error(e: yaml.YAMLError, name: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark else ""
    return ConfigError("", f"{_where(name)}invalid YAML{where}: {short(getattr(e, 'problem', None) or e, 100)}")


def load_yaml_text(text: str, name: str = ""):
    """Safe-load one YAML document within the limits above."""
    if len(text) > MAX_BYTES:
        raise ConfigError("", f"{_where(name)}YAML larger than {MAX_BYTES // 1024} KiB: refused")
    check_events(text, name)
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        raise _yaml_error(e, name) from None
    except RecursionError:
        raise ConfigError("", f"{_where(name)}YAML nested too deeply") from None


def read_yaml_file(path: str | Path):
    """Read a YAML file: size checked before reading it all, strict UTF-8, then :func:`load_yaml_text`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError("", f"{path}: YAML file of {size:,} bytes, larger than the "
                                  f"{MAX_BYTES // 1024} KiB limit: refused")
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError("", f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError("", f"{path}: YAML larger than {MAX_BYTES // 1024} KiB: refused")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    if "\x00" in text:
        raise ConfigError("", f"{path}: not a text file (NUL byte at offset {text.index(chr(0))})")
    return load_yaml_text(text, str(path))
