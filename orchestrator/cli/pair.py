"""``mergenet validate``, ``train`` and ``pairs``: one pair config at a time."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from mergenet_core.errors import ConfigError, MergenetError

from .common import EXIT_USAGE, PROG, fail


def _load(path: str, overrides: list[str] | None = None):
    from orchestrator.config import load_config

    return load_config(path, overrides)


def cmd_validate(args) -> int:
    from mergenet_core.config import ConfigErrors
    from mergenet_core.methods import Note

    bad = 0
    for path in args.configs:
        try:
            warnings: list[str] = []
            if args.deep and sys.stderr.isatty():  # seconds per pair: say what is going on
                print(f"{path}: building every pair (--deep: data, weights, adapters) ...", file=sys.stderr,
                      flush=True)
            load_any(path, args.set, warnings, deep=args.deep)
            for w in warnings:  # a method's Note states a fact (e.g. the adapters' size): on stdout
                note = isinstance(w, Note)
                print(f"{'note' if note else 'warning'}: {path}: {w}", file=sys.stdout if note else sys.stderr)
            print(f"ok: {path}")
        except ConfigErrors as e:
            bad += 1
            fail(e.lines, f"{path}: ")
        except MergenetError as e:
            bad += 1
            fail([str(e)], f"{path}: ")
    return EXIT_USAGE if bad else 0


def load_any(path: str, overrides: list[str] | None = None, warnings: list[str] | None = None,
             deep: bool = True):
    """A pair config, or a grid config (``pairs:`` key) — validated either way; the methods'
    warnings (e.g. a layer pair writing into an unnormalised layer) go to ``warnings``.
    ``deep``: build every pair (data decoded, models with weights, adapters); else the fast
    check from file metadata and weightless models (no Ray, no MLflow)."""
    from mergenet_core.config import read_yaml

    try:
        is_grid = "pairs" in read_yaml(path)
    except MergenetError:
        is_grid = False
    if is_grid:
        from orchestrator.grid.load import load_grid

        return load_grid(path, overrides, warnings=warnings, build=deep)
    cfg = _load(path, overrides)
    from mergenet_core.config import ConfigErrors
    from orchestrator.grid.load import check_layers

    problems = check_layers(cfg, warnings, build=deep)  # layer names, ranks, data present
    if problems:
        raise ConfigErrors(problems)
    return cfg


def cmd_train(args) -> int:
    from mergenet_core.io.safe_io import prepare_run_dir

    cfg = _load(args.config, args.set)
    out = Path(args.out or Path("runs") / f"{cfg.name}-s{cfg.seed}")
    # nothing lost: a folder holding a run needs --resume or --overwrite; --resume needs a checkpoint
    prepare_run_dir(out, resume=args.resume, overwrite=args.overwrite, ray=args.ray)
    if args.ray and args.resume:  # a corrupt or foreign checkpoint: one line here, not a worker failure
        from mergenet_core.io.safe_io import load_checkpoint, ray_checkpoints

        load_checkpoint(ray_checkpoints(out)[-1])
    if args.ray:  # the split topology's run, the code a grid trial of that topology runs
        from orchestrator import topology
        from orchestrator.cluster.connect import ensure_ray

        ensure_ray(args.address)
        # a fresh run starts in a folder prepare_run_dir emptied; --resume restores the Train run there
        final = topology.get("split").run(cfg, topology.RunRequest(out))
    else:
        from mergenet_core.training.engine import Engine
        from orchestrator import interrupts

        interrupts.install()  # the last checkpoint.pt is what --resume continues from
        try:
            final = Engine(cfg, out, progress=not args.quiet).run(resume=args.resume)
        except interrupts.Interrupted as e:
            e.finished, e.total, e.what = _saved_epoch(out), cfg.target.recipe.epochs, "epochs"
            e.resume = shlex.join([PROG, "train", args.config, *(x for kv in args.set for x in ("--set", kv)),
                                   "--out", str(out), "--resume"])
            raise
    print(json.dumps(final, indent=2))
    print(f"outputs: {out}")
    return 0


def _saved_epoch(out: Path) -> int:
    """The epoch of the run's last bundle (what ``--resume`` continues from)."""
    from mergenet_core.training.loop import CHECKPOINT, load_bundle

    return int(load_bundle(out / CHECKPOINT)["epoch"]) if (out / CHECKPOINT).exists() else 0


def cmd_pairs(args) -> int:
    from mergenet_core.models.inspect import describe, rank_targets, suggest_pairs

    models = {}
    for role, (name, model) in _pair_models(args).items():
        models[role] = model
        rows = describe(model)
        print(f"# {role}: {name} ({sum(r.numel for r in rows):,} parameters)")
        for r in rows:
            if len(r.shape) >= 2 or args.all:
                mark = "normalised" if r.normalised else ("UNNORMALISED" if r.pairable else "")
                print(f"  {r.name:<55} {str(tuple(r.shape)):<22} {r.role:<17} {mark}")
    print("# target candidates, safest first (a normalisation layer follows; classifier / "
          "unnormalised layers last and marked)")
    for r in rank_targets(describe(models["target"]))[:args.top]:
        risk = "" if r.normalised else "   # UNNORMALISED: writes rescale its output" + (
            " (classifier)" if r.role == "classifier" else "")
        print(f"  {r.name:<55} {str(tuple(r.shape)):<22}{risk}")
    print("# suggested layer pairs (source -> target)")
    for s, t, why in suggest_pairs(models["source"], models["target"]):
        print(f"  - {{source: {s}, target: {t}}}   # {why}")
    return 0


def _pair_models(args) -> dict:
    """role -> (label, model built without weights): from ``--config``'s roles on their tasks'
    probed shapes, else the named models with their ``--*-options`` on their modality's
    stand-in task (no data read either way)."""
    from mergenet_core.config import ConfigErrors
    from mergenet_core.data import get_modality, probe_task
    from mergenet_core.io.safe_yaml import load_yaml_text
    from mergenet_core.models import MODELS, build_model_shapes
    from mergenet_core.plugins import load_plugins

    load_plugins(args.plugin)
    if args.config:
        cfg = _load(args.config)
        specs = {r: (getattr(cfg, r).model.name, getattr(cfg, r).model.options,
                     probe_task(getattr(cfg, r).task.name, getattr(cfg, r).task.options).info)
                 for r in ("source", "target") if getattr(cfg, r) is not None}
        if len(specs) < 2:
            raise ConfigErrors(["source: the config has no source model to pair"])
    else:
        if not (args.source and args.target):
            raise ConfigErrors(["pairs: give SOURCE and TARGET model names, or --config PAIR.yaml"])
        specs = {}
        for role, name, raw in (("source", args.source, args.source_options),
                                ("target", args.target, args.target_options)):
            opts = load_yaml_text(raw, f"--{role}-options") if raw else {}
            if not isinstance(opts, dict):
                raise ConfigErrors([f"--{role}-options: a mapping, e.g. '{{name: resnet18}}'"])
            modality = MODELS.get(name, f"{role}").meta.get("modality", "image")
            specs[role] = (name, opts, get_modality(modality).example_info(args.num_classes))
    out = {}
    for role, (name, opts, info) in specs.items():
        try:
            out[role] = (name + (f" {opts}" if opts else ""), build_model_shapes(name, opts, info))
        except ConfigError as e:
            raise ConfigErrors([f"{role}.{e}"]) from None
    return out
