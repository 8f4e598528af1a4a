"""Shared builders for tiny, fast pair configs (real Fashion-MNIST on small subsets).

``tiny_pair()`` returns a plain dict (what a YAML file would hold), so tests can dump it to
YAML for the CLI, tweak it, or feed it to :func:`mergenet_core.config.parse_config`.
"""
from __future__ import annotations

import copy
import json
import math
import socket
from pathlib import Path
from typing import Any

import yaml

from mergenet_core.config import deep_merge

# Tiny option blocks for every image model (fast on 2 CPU cores).
TINY_MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"channels": [8, 16], "hidden": 32},
    "resnet18": {"width": 8, "blocks": [1, 1, 1, 1]},
    "resnet34": {"width": 8, "blocks": [1, 1, 1, 1]},
    "resnet50": {"width": 8, "blocks": [1, 1, 1, 1]},
    "mobilenetv2": {"width_mult": 0.25},
}

# A small Fashion-MNIST task: 28x28 grey, a few hundred training images.
TINY_TASK: dict[str, Any] = {
    "name": "fashion_mnist",
    "options": {"image_size": 28, "channels": 1, "train_subset": 320, "test_subset": 128,
                "val_fraction": 0.2},
}

TINY_RECIPE: dict[str, Any] = {
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
    "schedule": {"name": "cosine"},
    "epochs": 1,
    "batch_size": 32,
    "eval_batch_size": 256,
    "steps_per_epoch": 4,
}


def limit_threads(n: int = 1) -> None:
    """Use ``n`` intra-op threads. On a shared 2-core machine torch's OpenMP pool stalls badly
    (50x seen) when the cores are busy; subprocesses get :data:`SUBPROCESS_ENV_OVERRIDES`."""
    import torch

    torch.set_num_threads(n)


SUBPROCESS_ENV_OVERRIDES = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def model_spec(model: str | dict) -> dict:
    """``"cnn"`` -> ``{"name": "cnn", "options": TINY_MODELS["cnn"]}``; a dict passes through."""
    if isinstance(model, dict):
        return copy.deepcopy(model)
    return {"name": model, "options": copy.deepcopy(TINY_MODELS.get(model, {}))}


def tiny_pair(method: str = "alone", method_options: dict | None = None,
              source_model: str | dict | None = "cnn", target_model: str | dict = "cnn",
              task: dict | None = None, **overrides: Any) -> dict:
    """A tiny pair config dict.

    ``source_model=None`` leaves out the source role. ``overrides`` are deep-merged into the
    result last (e.g. ``recipe={"epochs": 2}``, ``seed=3``, ``target={"task": {...}}``).
    """
    task = copy.deepcopy(task or TINY_TASK)
    cfg: dict[str, Any] = {
        "name": f"tiny-{method}",
        "seed": 0,
        "device": "cpu",
        "target": {"model": model_spec(target_model), "task": copy.deepcopy(task)},
        "recipe": copy.deepcopy(TINY_RECIPE),
        "method": {"name": method, "options": copy.deepcopy(method_options or {})},
    }
    if source_model is not None:
        cfg["source"] = {"model": model_spec(source_model), "task": copy.deepcopy(task)}
    return deep_merge(cfg, overrides)


def mergenet_options(source: str = "classifier.weight", target: str = "classifier.weight",
                     rank: int = 2, **extra: Any) -> dict:
    """A small MergeNet options block: one layer pair, a 1-layer 2-head adapter, t_cycle 1."""
    opts = {"t_cycle": 1,
            "layer_pairs": [{"source": source, "target": target, "mode": "learned", "rank": rank}],
            "adapter": {"layers": 1, "heads": 2}}
    return deep_merge(opts, extra)


def write_yaml(path: str | Path, data: dict | str) -> Path:
    """Write a dict (as YAML) or raw text to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def numeric_items(record: dict) -> dict[str, float]:
    """The record's numeric values, without timings (``time/*`` keys and ``*_ms`` keys)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.startswith("time/") and not k.endswith("_ms")}


def assert_same_metrics(a: list[dict], b: list[dict], tol: float = 1e-6) -> None:
    """Same epochs, same keys, every non-timing number equal (exactly or within ``tol``)."""
    assert len(a) == len(b), (len(a), len(b))
    for ra, rb in zip(a, b):
        na, nb = numeric_items(ra), numeric_items(rb)
        assert na.keys() == nb.keys(), (sorted(na.keys() ^ nb.keys()))
        for k in na:
            assert math.isclose(na[k], nb[k], rel_tol=0, abs_tol=tol), (ra["epoch"], k, na[k], nb[k])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tiny_grid(name: str, *, task: dict, epochs: int, steps_per_epoch: int, target_model: dict,
              methods: dict, seeds, ray: dict | None = None, **extra: Any) -> dict:
    """A one-pair grid of two tiny CNNs (MergeNet links the classifiers at rank 2), on CPU with
    half a CPU per worker; ``ray`` goes to ``base.ray``, ``extra`` to the top level."""
    g = {
        "grid": name,
        "base": {"device": "cpu", "recipe": {"epochs": epochs, "batch_size": 32, "steps_per_epoch": steps_per_epoch,
                                             "eval_batch_size": 256}},
        "pairs": [{"name": "cnn-cnn",
                   "source": {"model": {"name": "cnn", "options": TINY_MODELS["cnn"]}, "task": task},
                   "target": {"model": target_model, "task": task},
                   "layer_pairs": [{"source": "classifier.weight", "target": "classifier.weight", "rank": 2}]}],
        "methods": methods,
        "seeds": list(seeds),
        "resources": {"cpus_per_worker": 0.5},
    }
    if ray:
        g["base"]["ray"] = ray
    g.update(extra)
    return g


def step_metrics(data: dict, out: str | Path) -> dict[str, list[dict]]:
    """An engine run of ``data`` in ``out``: after every step, each role's running train stats
    (loss sum and correct count since the last evaluation) and the sum of its state dict (every
    weight and buffer); and the ``metrics.jsonl`` records (:func:`numeric_items`: no timings).
    What tests/golden/step_metrics.json holds per case (``python tests/make_golden.py``)."""
    from mergenet_core.checks import parse_config
    from mergenet_core.engine import Engine

    engine = Engine(parse_config(data), out, progress=False)
    pair, take = engine.pair, engine.step
    steps: list[dict] = []

    def step(k: int) -> None:
        take(k)
        rec: dict[str, float] = {"epoch": pair.epoch, "step": k}
        for name, role in pair.roles.items():
            rec[f"{name}/loss_sum"] = role.stats["loss"]
            rec[f"{name}/correct"] = role.stats["correct"]
            rec[f"{name}/state_sum"] = sum(float(v.double().sum()) for v in role.model.state_dict().values())
        steps.append(rec)

    engine.step = step  # the loop calls host.step
    engine.run()
    return {"steps": steps, "epochs": [numeric_items(r) for r in read_metrics(out)]}
