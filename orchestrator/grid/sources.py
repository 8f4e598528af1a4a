"""Models a grid trains before its trials (``sources:``), cached and referred to by name.

A grid may declare ``sources: {NAME: <train config>}``: each value is a pair config as
``mergenet train`` takes it (usually the ``alone`` method: one model on one task). Any
``init_from`` in the grid (its ``base``, a pair, an arm, or a per-pair arm override) may name one
as ``sources:NAME``. ``mergenet run`` then

1. validates everything before any work, every trial built once as without sources (a
   reference to a source not trained yet is checked against the shapes its model will have:
   :data:`mergenet_core.io.init_weights.PLANNED`);
2. trains each missing source in this process (the single-process engine), or reuses it;
3. runs the grid, whose trials start from ``<sources dir>/NAME-KEY``.

``KEY`` is a hash of the source's resolved config (model, task and data options, recipe, seed)
and of the training code (every ``mergenet_core`` source file), so a changed config, data
option or code version trains a new source and an unchanged one is reused. The sources folder
is ``sources/`` beside the grid's storage folder (``runs/sources`` by default; on a cluster the
shared ``storage_path``'s parent -- a shared folder or a bucket, where a source is trained in a
local scratch folder and uploaded -- so every node reads the same files).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mergenet_core.errors import ConfigError

PREFIX = "sources:"
_CODE: str | None = None


def code_version() -> str:
    """Hash of every ``mergenet_core`` Python file (the code that trains a source)."""
    global _CODE
    if _CODE is None:
        import mergenet_core

        root = Path(mergenet_core.__file__).parent
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
        _CODE = h.hexdigest()
    return _CODE


def source_key(cfg) -> str:
    """12 hex digits over the resolved config (its run name aside; starting weights and plugin
    files by content) and the code version."""
    data = cfg.model_dump(mode="json")
    data.pop("name", None)
    for role in ("source", "target"):  # a source's own starting weights: by content, not by path
        init = (data.get(role) or {}).get("init_from")
        if init:
            init["path"] = _content_hash(init["path"])
    # a plugin file by its content (an edited model plugin is another source); a module by its name
    data["plugins"] = [_content_hash(p) if p.endswith(".py") else p for p in data.get("plugins", [])]
    blob = json.dumps({"config": data, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _content_hash(path: str) -> str:
    """sha256 of a local weights file (a folder: its bundle); the path itself for a URI or a
    missing file (validation reports that)."""
    from mergenet_core.io.init_weights import BUNDLE_NAMES

    p = Path(path)
    if p.is_dir():
        p = next((p / n for n in BUNDLE_NAMES if (p / n).is_file()), p)
    if "://" in path or not p.is_file():
        return path
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sources_root(storage_path: str | None):
    """``sources/`` beside the grids folder: a local folder, or a bucket location."""
    from orchestrator.cluster.storage import Location

    return Location.parse(storage_path or "runs/grids").parent / "sources"


def source_configs(sources: dict[str, dict], plugins: list[str] = ()) -> dict[str, Any]:
    """NAME -> validated pair config (the grid's ``plugins`` added to each); ``ConfigErrors``
    lines name ``sources.NAME.<field>``."""
    from mergenet_core.config import ConfigErrors
    from orchestrator.config import parse_config

    out, lines = {}, []
    for name, data in sources.items():
        try:
            own = data.get("plugins") or []
            extra = {"plugins": list(dict.fromkeys([*plugins, *own]))} if plugins else {}
            out[name] = parse_config({"name": f"source-{name}", **data, **extra})
        except ConfigErrors as e:
            lines.extend(f"sources.{name}.{line}" for line in e.lines)
        except ConfigError as e:
            lines.append(f"sources.{name}.{e}")
    if lines:
        raise ConfigErrors(lines)
    return out


def source_dirs(configs: dict[str, Any], storage_path: str | None) -> dict[str, Path | str]:
    """NAME -> the source's folder: a local path, or a bucket URI (``init_from`` reads both)."""
    root = sources_root(storage_path)
    out = {}
    for name, cfg in configs.items():
        loc = root / f"{name}-{source_key(cfg)}"
        out[name] = loc.local if loc.local is not None else loc.uri
    return out


def is_trained(folder: Path | str) -> bool:
    from orchestrator.cluster.storage import Location

    loc = Location.parse(folder)
    return (loc / "final.json").exists() and (loc / "checkpoint.pt").exists()


def resolve_refs(data: Any, dirs: dict[str, Path], where: str = "") -> list[str]:
    """Replace every ``init_from: sources:NAME`` (string or ``{path: ...}``) in ``data`` in place
    by the source's folder; returns ``field: problem`` lines for unknown names."""
    lines: list[str] = []

    def fix(value: str, field: str) -> str:
        name = value[len(PREFIX):]
        if name not in dirs:
            known = ", ".join(sorted(dirs)) or "none declared"
            lines.append(f"{field}: unknown source '{name[:40]}' (grid sources: {known})")
            return value
        return str(dirs[name])

    def walk(d: Any, path: str) -> None:
        if isinstance(d, list):
            for i, v in enumerate(d):
                walk(v, f"{path}.{i}")
        elif isinstance(d, dict):
            for k, v in d.items():
                field = f"{path}.{k}" if path else str(k)
                key = str(k)  # also dotted keys (a pair's `arms:` overrides): source.init_from[.path]
                is_init = key == "init_from" or key.endswith(".init_from")
                if (is_init or key.endswith(".init_from.path")) and isinstance(v, str) and v.startswith(PREFIX):
                    d[k] = fix(v, field)
                elif is_init and isinstance(v, dict) and str(v.get("path", "")).startswith(PREFIX):
                    v["path"] = fix(v["path"], f"{field}.path")
                else:
                    walk(v, field)

    walk(data, where)
    return lines


def plan(configs: dict[str, Any], dirs: dict[str, Path]) -> None:
    """Register each untrained source's future checkpoint shapes for fast validation."""
    from mergenet_core.io.init_weights import PLANNED

    for name, cfg in configs.items():
        if not is_trained(dirs[name]):
            PLANNED[str(dirs[name])] = (name, _shapes_builder(cfg))


def _shapes_builder(cfg):
    def build():
        from mergenet_core.data import probe_task
        from mergenet_core.models import build_model_shapes

        t = cfg.target
        return build_model_shapes(t.model.name, t.model.options, probe_task(t.task.name, t.task.options).info)
    return build


def train_missing(configs: dict[str, Any], dirs: dict[str, Path], log=print) -> dict[str, dict]:
    """Train every source whose folder holds no finished run (a local folder resumes an
    interrupted one from its last checkpoint; with bucket storage the checkpoint is uploaded only
    at the end, so an interrupted source trains again); one console line per source. Returns
    NAME -> its ``final.json``. A source trains as any pair does, through the inline topology (one
    process, resumed from its folder's checkpoint). Two runs training the same source at once are
    not coordinated."""
    import shutil

    from mergenet_core.io.init_weights import PLANNED
    from orchestrator import topology
    from orchestrator.cluster.storage import Location, scratch_dir

    out = {}
    for name, cfg in configs.items():
        loc = Location.parse(dirs[name])
        if is_trained(dirs[name]):
            final = json.loads((loc / "final.json").read_text())
            log(f"source {name}: reused {dirs[name]} (test acc {_acc(final)})")
        else:
            t0 = time.perf_counter()
            work = loc.local or scratch_dir("source", name)  # a bucket: train locally, then upload
            if loc.local is None and (loc / "checkpoint.pt").exists():
                (work / "checkpoint.pt").write_bytes((loc / "checkpoint.pt").read_bytes())
            work.mkdir(parents=True, exist_ok=True)
            final = topology.get("inline").run(cfg, topology.RunRequest(work, keep_bundles="last"))
            _slim(work / "checkpoint.pt")
            if loc.local is None:
                loc.upload(work, [p.name for p in work.iterdir() if p.is_file()])
                shutil.rmtree(work, ignore_errors=True)
            log(f"source {name}: trained in {time.perf_counter() - t0:.0f} s -> {dirs[name]} "
                f"(test acc {_acc(final)})")
        PLANNED.pop(str(dirs[name]), None)
        out[name] = final
    return out


def _slim(bundle: Path) -> None:
    """Keep only the trained models' weights in a finished source's bundle (no optimiser state,
    RNG or data-stream positions): what ``init_from`` reads, at a third of the size."""
    import torch

    state = torch.load(bundle, map_location="cpu", weights_only=True)
    roles = {name: {"model": r["model"]} for name, r in state.get("roles", {}).items()}
    tmp = bundle.with_suffix(".tmp")
    torch.save({"roles": roles}, tmp)
    tmp.replace(bundle)


def _acc(final: dict) -> str:
    v = final.get("target/final_test_acc")
    return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "?"
