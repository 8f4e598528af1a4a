"""GPU placement on a CPU machine: the session's local Ray declares GPUs it does not have
(``conftest.DECLARED_GPUS``), and Ray's own scheduler places what our code asks for: the split
topology's worker bundles (:func:`orchestrator.topology.split.plan.worker_bundle`, Ray Train's
``resources_per_worker`` in a placement group of ``ray.placement``), an inline trial's bundle
(:func:`orchestrator.grid.tuner.trial_resources`, from each trial's resolved spec), and the preflight that refuses a pair asking
for more GPUs than exist. No CUDA code runs (NCCL and CUDA need real GPUs: the GPU suite,
``benchmarks/gpu_suite.py``, runs the core there)."""
from __future__ import annotations

import time

import pytest
from conftest import DECLARED_GPUS

from helpers import mergenet_options, tiny_grid, tiny_pair, write_yaml

pytestmark = pytest.mark.usefixtures("ray_local")


def _pair(**ray):
    from orchestrator.config import parse_config

    return parse_config(tiny_pair("mergenet", mergenet_options(), ray={"cpus_per_worker": 0.25, **ray}))


def _plan(cfg, workers: int | None = None):
    from orchestrator.topology.split.plan import PairPlan
    from orchestrator.topology.split.plan import worker_layout

    layout = worker_layout(cfg, cfg_roles(cfg)) if workers is None else ["target"] * workers
    return PairPlan(layout, False, {"link": None}, 1)


def cfg_roles(cfg):
    from mergenet_core.methods import METHODS

    method_cls = METHODS.get(cfg.method.name).fn
    return method_cls.roles(None)


@pytest.fixture
def gpu_ids_of():
    """``gpu_ids_of(bundles, strategy, keep=False)``: reserve a placement group of these bundles (as Ray Train
    does for the worker group), run one task in each bundle, return each task's
    ``ray.get_gpu_ids()``; the group is removed then (``keep``: at the test's end)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    groups = []

    @ray.remote
    def where():
        return [str(i) for i in ray.get_gpu_ids()]

    def run(bundles: list[dict], strategy: str, keep: bool = False) -> list[list[str]]:
        pg = placement_group(bundles, strategy=strategy)
        groups.append(pg)
        assert pg.wait(20), f"placement group {bundles} ({strategy}) not placed"
        ids = ray.get([where.options(num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0),
                                     scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                       for i, b in enumerate(bundles)], timeout=30)
        if not keep:
            remove_placement_group(groups.pop())
        return ids

    yield run
    for pg in groups:
        remove_placement_group(pg)


def test_split_topology_gives_source_and_target_different_gpus(gpu_ids_of):
    """``use_gpu``: one whole GPU per role worker, so the target (world rank 0) and the source get
    different GPU ids, under PACK (the default: both on this one node) as under SPREAD."""
    from orchestrator.topology.split.plan import worker_bundle
    from orchestrator.topology import choose

    cfg = _pair(use_gpu=True)
    assert choose(cfg).name == "split"
    plan = _plan(cfg)
    assert plan.layout == ["target", "source"]
    bundle = worker_bundle(cfg)
    assert bundle == {"CPU": 0.25, "GPU": 1.0}
    for strategy in ("PACK", "SPREAD"):
        ids = dict(zip(plan.layout, gpu_ids_of([bundle] * plan.num_workers, strategy)))
        assert len(ids["target"]) == len(ids["source"]) == 1, ids
        assert ids["target"] != ids["source"], ids


def test_fractional_gpus_per_role_share_one_gpu(gpu_ids_of):
    """``ray.gpus_per_worker: 0.5``: each role worker holds half a GPU, so a packed pair's two
    workers share one GPU id, and two such pairs fill the 2 declared GPUs exactly."""
    from orchestrator.topology.split.plan import worker_bundle

    cfg = _pair(use_gpu=True, gpus_per_worker=0.5, placement="STRICT_PACK")
    bundle = worker_bundle(cfg)
    assert bundle == {"CPU": 0.25, "GPU": 0.5}
    first = gpu_ids_of([bundle, bundle], "STRICT_PACK", keep=True)
    second = gpu_ids_of([bundle, bundle], "STRICT_PACK", keep=True)
    assert all(len(i) == 1 for i in first + second), (first, second)
    held = [g for ids in first + second for g in ids]
    assert sorted(held.count(g) for g in set(held)) == [2] * DECLARED_GPUS, held  # 2 workers per GPU


def test_several_inline_trials_per_gpu_are_scheduled_as_asked(tmp_path):
    """A grid with ``resources: {use_gpu: true, gpus_per_worker: 0.5}`` on the inline topology:
    each trial's bundle holds half a GPU, so 2 declared GPUs hold 4 trials at once and a 5th
    waits (Tune starts a trial only when its placement group is placed)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from orchestrator.grid.load import load_grid
    from orchestrator.grid.spec import resolve_all
    from orchestrator.grid.tuner import trial_resources

    g = tiny_grid("gpu-pack", ray={"topology": "inline"})
    g["resources"] = {"use_gpu": True, "gpus_per_worker": 0.5, "cpus_per_worker": 0.1}
    grid = load_grid(write_yaml(tmp_path / "grid.yaml", g), deep=False)
    specs = resolve_all(grid)  # each trial resolved once, its resources with it
    pgf = trial_resources(specs)({"trial": specs["cnn-cnn/alone/s0"].tune_config()})
    assert pgf.bundles == [{"CPU": 0.1, "GPU": 0.5}]
    per_gpu = round(1 / 0.5)
    groups = [pgf.to_placement_group() for _ in range(DECLARED_GPUS * per_gpu + 1)]
    try:
        refs = [pg.ready() for pg in groups]
        ready, _ = ray.wait(refs, num_returns=len(groups) - 1, timeout=15)
        assert len(ready) == DECLARED_GPUS * per_gpu, len(ready)
        time.sleep(1.0)  # the last one waits: the GPUs are full
        ready, waiting = ray.wait(refs, num_returns=len(groups), timeout=0.1)
        assert len(ready) == DECLARED_GPUS * per_gpu and len(waiting) == 1, (len(ready), len(waiting))
    finally:
        for pg in groups:
            remove_placement_group(pg)


@pytest.mark.parametrize("ray_section, line", [
    ({"use_gpu": True, "target_workers": 2},
     f"ray.use_gpu: the pair needs 3 GPUs (3 workers x 1) but the cluster has {DECLARED_GPUS}"),
    ({"use_gpu": True, "gpus_per_worker": 2},
     f"ray.gpus_per_worker: the pair needs 4 GPUs (2 workers x 2) but the cluster has {DECLARED_GPUS}"),
    ({"use_gpu": True, "gpus_per_worker": 0.75, "adapter": {"num_gpus": 1}},
     f"ray.gpus_per_worker: the pair needs 2.5 GPUs (2 workers x 0.75 + 1 for the adapter) but the cluster "
     f"has {DECLARED_GPUS}"),
])
def test_a_pair_asking_for_more_gpus_than_exist_is_refused_in_one_line(monkeypatch, ray_section, line):
    """The preflight every Ray pair passes before any worker starts (``orchestrator.topology.split.driver.preflight``,
    after the config's validation) refuses it on a Ray started here: one ``field: problem`` line
    (the CLI prints it and exits 2)."""
    from mergenet_core.errors import ConfigError
    from orchestrator.cluster.connect import RESOURCE_CHECK_ENV
    from orchestrator.topology.split.plan import check_resources

    monkeypatch.delenv(RESOURCE_CHECK_ENV, raising=False)
    cfg = _pair(**ray_section)
    with pytest.raises(ConfigError) as e:
        check_resources(cfg, _plan(cfg))
    assert str(e.value) == line and "\n" not in str(e.value)


def test_pairs_that_fit_pass_the_preflight(monkeypatch):
    from orchestrator.cluster.connect import RESOURCE_CHECK_ENV
    from orchestrator.topology.split.plan import check_resources

    monkeypatch.delenv(RESOURCE_CHECK_ENV, raising=False)
    for ray_section in ({"use_gpu": True}, {"use_gpu": True, "gpus_per_worker": 0.5, "target_workers": 3},
                        {"use_gpu": True, "gpus_per_worker": 0.5, "adapter": {"num_gpus": 1}}):
        cfg = _pair(**ray_section)
        check_resources(cfg, _plan(cfg))


@pytest.mark.parametrize("ray_section, line", [
    ({"gpus_per_worker": 0.5}, "ray.gpus_per_worker: needs use_gpu: true"),
    ({"use_gpu": True, "gpus_per_worker": 1.5}, "ray.gpus_per_worker: 1.5: above 1 GPU a worker takes whole GPUs"),
    ({"use_gpu": True, "gpus_per_worker": 0}, "ray.gpus_per_worker: Input should be greater than 0"),
])
def test_gpus_per_worker_is_validated_with_the_config(ray_section, line):
    from mergenet_core.config import ConfigErrors
    from mergenet_core.errors import ConfigError

    with pytest.raises((ConfigError, ConfigErrors)) as e:
        _pair(**ray_section)
    assert str(e.value).startswith(line), str(e.value)
