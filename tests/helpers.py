"""Shared builders for tiny, fast pair configs and grids (real Fashion-MNIST on small subsets),
the CLI in a subprocess, and the processes a test starts.

``tiny_pair()`` and ``tiny_grid()`` return plain dicts (what a YAML file would hold), so tests
can dump them to YAML for the CLI, tweak them, or feed them to
:func:`mergenet_core.config.parse_config`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mergenet_core.config import deep_merge

#: the checkout under test (the venv may hold another checkout installed in editable mode)
ROOT = Path(__file__).resolve().parents[1]

# Tiny option blocks for every image model (fast on 2 CPU cores).
TINY_MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"channels": [8, 16], "hidden": 32},
    "resnet18": {"width": 8, "blocks": [1, 1, 1, 1]},
    "resnet34": {"width": 8, "blocks": [1, 1, 1, 1]},
    "resnet50": {"width": 8, "blocks": [1, 1, 1, 1]},
    "mobilenetv2": {"width_mult": 0.25},
}
#: two-tower models (image+text): a tiny CNN image tower and a 1-layer untrained MiniLM-L3 text tower
TINY_TOWERS: dict[str, Any] = {"image": {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}},
                               "text": {"name": "minilm_l3", "options": {"pretrained": False, "num_layers": 1}},
                               "dim": 32}
TINY_MODELS["vqa"] = {**TINY_TOWERS, "hidden": 32}
TINY_MODELS["retrieval"] = dict(TINY_TOWERS)

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


def fmnist_task(train: int = 320, test: int = 128, val_fraction: float | None = 0.2, **options: Any) -> dict:
    """A Fashion-MNIST task on ``train`` training and ``test`` test images; ``val_fraction=None``
    leaves the option out (e.g. for ``val_size=...``); ``options`` are added as they are."""
    opts: dict[str, Any] = {"train_subset": train, "test_subset": test}
    if val_fraction is not None:
        opts["val_fraction"] = val_fraction
    return {"name": "fashion_mnist", "options": {**opts, **options}}


def limit_threads(n: int = 1) -> None:
    """Use ``n`` intra-op threads. tests/conftest.py already sets one for the whole session (on a
    shared 2-core machine torch's OpenMP pool stalls badly, 50x seen, when the cores are busy),
    so a module needs this only to change it; subprocesses get :func:`cli_env`."""
    import torch

    torch.set_num_threads(n)


SUBPROCESS_ENV_OVERRIDES = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# worker processes that are quick on 2 shared cores (a Ray the test starts itself)
FAST_ENV = {**SUBPROCESS_ENV_OVERRIDES, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}

#: the command line of ``mergenet`` from this checkout
CLI = [sys.executable, "-m", "orchestrator.cli"]


def cli_env(**extra: str | None) -> dict[str, str]:
    """``os.environ`` plus one thread per process (:data:`SUBPROCESS_ENV_OVERRIDES`) and this
    checkout first on ``PYTHONPATH``, then ``extra``: a variable set to ``None`` is removed."""
    env = dict(os.environ, **SUBPROCESS_ENV_OVERRIDES)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_cli(*args: Any, cwd: str | Path | None = None, env: dict[str, str | None] | None = None,
            timeout: float = 120, check: int | None = None) -> subprocess.CompletedProcess:
    """``mergenet ARGS`` in a subprocess, in ``cwd`` (default: the checkout), with
    ``cli_env(**env)``; output captured as text. ``check``: the exit status it must end with
    (the output's tails are the assertion message)."""
    r = subprocess.run([*CLI, *map(str, args)], cwd=cwd or ROOT, env=cli_env(**(env or {})), capture_output=True,
                       text=True, timeout=timeout)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout[-3000:] + r.stderr[-3000:])
    return r


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


def mergenet_arm(**extra: Any) -> dict:
    """A grid's MergeNet arm: t_cycle 1, a 1-layer 2-head adapter (the layer pairs are the pair's)."""
    return deep_merge({"t_cycle": 1, "adapter": {"layers": 1, "heads": 2}}, extra)


def tiny_grid(name: str, *, task: dict | None = None, epochs: int = 1, steps_per_epoch: int = 2,
              target_model: str | dict = "cnn", methods: dict | None = None, seeds=(0,), ray: dict | None = None,
              **extra: Any) -> dict:
    """A one-pair grid: a tiny CNN source (MergeNet links the classifiers at rank 2) and
    ``target_model`` on ``task`` (default :func:`fmnist_task`), arms ``methods`` (default alone
    only), on CPU with half a CPU per worker; ``ray`` goes to ``base.ray``, ``extra`` to the top
    level (replacing what is there). Every argument is copied: presets may be shared."""
    task = task or fmnist_task()
    g = {
        "grid": name,
        "base": {"device": "cpu", "recipe": {"epochs": epochs, "batch_size": 32, "steps_per_epoch": steps_per_epoch,
                                             "eval_batch_size": 256}},
        "pairs": [{"name": "cnn-cnn",
                   "source": {"model": model_spec("cnn"), "task": copy.deepcopy(task)},
                   "target": {"model": model_spec(target_model), "task": copy.deepcopy(task)},
                   "layer_pairs": [{"source": "classifier.weight", "target": "classifier.weight", "rank": 2}]}],
        "methods": copy.deepcopy(methods if methods is not None else {"alone": {}}),
        "seeds": list(seeds),
        "resources": {"cpus_per_worker": 0.5},
    }
    if ray:
        g["base"]["ray"] = copy.deepcopy(ray)
    g.update(copy.deepcopy(extra))
    return g


def step_metrics(data: dict, out: str | Path) -> dict[str, list[dict]]:
    """An engine run of ``data`` in ``out``: after every step, each role's running train stats
    (loss sum and correct count since the last evaluation) and the sum of its state dict (every
    weight and buffer); and the ``metrics.jsonl`` records (:func:`numeric_items`: no timings).
    What tests/golden/step_metrics.json holds per case (``python tests/make_golden.py``)."""
    from mergenet_core.config.checks import parse_config
    from mergenet_core.training.engine import Engine

    engine = Engine(parse_config(data), out, progress=False)
    pair, take = engine.pair, engine.step
    steps: list[dict] = []

    def step(k: int) -> None:
        take(k)
        rec: dict[str, float] = {"epoch": pair.epoch, "step": k}
        for name, role in pair.roles.items():
            rec[f"{name}/loss_sum"] = float(role.stats["loss"])  # kept on the device between epochs
            rec[f"{name}/correct"] = int(role.stats["correct"])
            rec[f"{name}/state_sum"] = sum(float(v.double().sum()) for v in role.model.state_dict().values())
        steps.append(rec)

    engine.step = step  # the loop calls host.step
    engine.run()
    return {"steps": steps, "epochs": [numeric_items(r) for r in read_metrics(out)]}


#: ``tiny_grid`` settings of the grids on a local Ray (test_grid, test_bucket_storage): alone and
#: MergeNet, seeds 0 and 1, two epochs of 3 steps, a one-stage target CNN, two trials at a time
RAY_GRID: dict[str, Any] = {"epochs": 2, "steps_per_epoch": 3,
                            "target_model": {"name": "cnn", "options": {"channels": [8], "hidden": 16}},
                            "methods": {"alone": {}, "mergenet": mergenet_arm()}, "seeds": (0, 1),
                            "max_concurrent_trials": 2}

#: ``tiny_grid`` settings of the multi-node and Ray Jobs grids (test_cluster, test_ray_up): MergeNet
#: only, one seed, one 2-step epoch on 128 images, one trial at a time and no retries
CLUSTER_GRID: dict[str, Any] = {"task": fmnist_task(128, 64, val_fraction=0.25), "epochs": 1, "steps_per_epoch": 2,
                                "methods": {"mergenet": mergenet_arm()}, "seeds": (0,),
                                "max_concurrent_trials": 1, "max_failures": 0}


# --------------------------------------------------------------------------- processes


def short_tmp(prefix: str) -> Path:
    """A short folder under /tmp (Ray's unix socket paths must stay under 107 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ship_dir(tmp_path: Path, grid: dict) -> Path:
    """A working directory like a checkout: the two packages and the grid file
    (``experiments/grid.yaml``), plus a ``runs/`` file a Ray job upload must leave out."""
    wd = tmp_path / "wd"
    for pkg in ("mergenet_core", "orchestrator"):
        shutil.copytree(ROOT / pkg, wd / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    write_yaml(wd / "experiments" / "grid.yaml", grid)
    (wd / "runs").mkdir()
    (wd / "runs" / "big.bin").write_bytes(b"\0" * 1024)  # excluded from the upload
    return wd


def _ppids() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(roots: list[int]) -> set[int]:
    """``roots`` and every process below them."""
    parent = _ppids()
    found = {r for r in roots if r in parent}
    grew = True
    while grew:
        grew = False
        for pid, pp in parent.items():
            if pp in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def pids_with(marker: str) -> set[int]:
    """Processes whose command line names ``marker`` (a temp dir only this test uses)."""
    me = os.getpid()
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != me:
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.add(int(d.name))
            except OSError:
                pass
    return out


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except (OSError, IndexError):
        return True


def stop_pids(pids: set[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds. Only the given PIDs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(0.2)


def stop_tree(roots: list[int], marker: str | None = None) -> None:
    """Stop the processes we started, their descendants and anything naming our marker."""
    pids = descendants(roots)
    if marker:
        pids |= descendants(sorted(pids_with(marker)))
    stop_pids(pids)


def provider_inputs(pair, transfers: int, link: str = "0") -> list:
    """Step a built MergeNet pair ``transfers`` times and return the provider matrix the adapter
    was given at each transfer (what a negative control feeds it)."""
    from mergenet_core.training.step import take_step

    m, seen = pair.method, []
    orig_put = m.exchange.put

    def put(step, mats):
        if (link, "y") in mats:
            seen.append(mats[(link, "y")].clone())
        orig_put(step, mats)

    m.exchange.put = put
    for step in range(transfers):
        take_step(pair, step)
    return seen


def import_graph(package: str) -> dict[str, set[str]]:
    """Every import inside ``package`` (module level, inside functions and under ``TYPE_CHECKING``)."""
    import ast

    mods = {}
    for f in (ROOT / package).rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(0, node.level - 1)):
                    base = base.rpartition(".")[0]
                tgt = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                names = [tgt] + [f"{tgt}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges[m] |= {n for n in names if n in mods and n != m}
        text = f.read_text()
        if f.name == "__init__.py" and ("iter_modules" in text or 'import_module(f"{__name__}.' in text):
            # imports every submodule (registries that find their modules by themselves)
            edges[m] |= {n for n in mods if n.rpartition(".")[0] == m}
    return edges


def assert_no_import_cycle(package: str) -> None:
    edges = import_graph(package)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])



def fmnist_image_folder(root: str | Path, train_per_class: int = 20, test_per_class: int = 8,
                        splits: tuple[str, ...] = ("train", "test")) -> Path:
    """An image folder in the torchvision ImageFolder layout (``root/SPLIT/CLASS/*.png``) written
    from the first Fashion-MNIST images of each class (train from its training file, the other
    splits from its test file); returns ``root``. Written once per ``root``."""
    import numpy as np
    from PIL import Image

    from mergenet_core.data.images import FMNIST_CLASSES, FMNIST_ROOT, read_idx

    root = Path(root)
    if (root / splits[0]).is_dir():
        return root
    sets = {"train": ("train", train_per_class), "test": ("t10k", test_per_class), "val": ("t10k", test_per_class)}
    for split in splits:
        prefix, per_class = sets[split]
        x = read_idx(Path(FMNIST_ROOT) / f"{prefix}-images-idx3-ubyte.gz", 0x803)
        y = read_idx(Path(FMNIST_ROOT) / f"{prefix}-labels-idx1-ubyte.gz", 0x801)
        skip = test_per_class if split == "val" else 0  # val and test: different test images
        for c, name in enumerate(FMNIST_CLASSES):
            folder = root / split / name.replace("/", "-")
            folder.mkdir(parents=True)
            for i in np.nonzero(y == c)[0][skip:skip + per_class]:
                Image.fromarray(x[i]).save(folder / f"{i:05d}.png")
    return root
