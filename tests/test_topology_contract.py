"""The topology contract (orchestrator/topology/): every registered topology asks Ray for
well-formed resources, runs a pair to the same numbers as the single-process engine, and drops
its bundles; a topology added as one module is picked by ``ray.topology`` and run by a grid's
trial driver with no other change."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import (ROOT, assert_same_metrics, fmnist_task, mergenet_options, read_metrics, run_cli, tiny_grid,
                     tiny_pair, write_yaml)
from mergenet_core.training.engine import Engine
from orchestrator import topology
from orchestrator.config import parse_config
from orchestrator.cluster.storage import Location

#: a case per registered topology: the ``ray`` section that selects it, and the tolerance of its
#: metrics against the engine (split: separate processes, gradients through the object store)
CASES = {"inline": ({"topology": "inline"}, 1e-6), "split": ({"topology": "split"}, 1e-5)}
#: the workers each topology records in placement.json for a MergeNet pair
ROLES = {"inline": ["pair"], "split": ["source", "target"]}


def _cfg(ray: dict):
    return parse_config(tiny_pair("mergenet", mergenet_options(), recipe={"epochs": 2, "steps_per_epoch": 3},
                                  ray=ray))


def test_every_registered_topology_has_a_case():
    from orchestrator.config import topology_modules

    # configs check names against the folder's modules without importing them: a topology
    # registers under its module's (or folder's) name
    assert sorted(topology.names()) == topology_modules() == sorted(CASES) == sorted(ROLES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_resources_are_placement_group_bundles(name):
    ray_section, _ = CASES[name]
    cfg = _cfg(ray_section)
    topo = topology.choose(cfg)
    assert topo.name == name
    bundles = topo.resources(cfg, driver_cpus=0.5)
    assert isinstance(bundles, list) and bundles
    assert all(isinstance(b, dict) and b and all(isinstance(v, (int, float)) and v >= 0 for v in b.values())
               for b in bundles)
    assert bundles[0]["CPU"] == (1.0 if name == "inline" else 0.5)  # the trial process: the pair, or its driver


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    Engine(_cfg({}), out, progress=False).run()
    return read_metrics(out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_run_equals_the_engine_and_drops_its_bundles(ray_local, tmp_path, engine_run, name):
    ray_section, tol = CASES[name]
    cfg = _cfg(ray_section)
    topo = topology.choose(cfg)
    store = Location.parse(tmp_path / "trial")
    out = tmp_path / "trial" / "pair"
    final = topo.run(cfg, topology.RunRequest(out, store))
    assert_same_metrics(engine_run, read_metrics(out), tol=tol)
    assert final["epochs"] == 2 and json.loads((out / "final.json").read_text()) == final
    kept = json.loads((out / "bundles.json").read_text())
    assert kept["last"]["epoch"] == 2 and Path(kept["last"]["path"]).exists()
    assert sorted(w["role"] for w in json.loads((out / "placement.json").read_text())) == ROLES[name]
    topo.drop_bundles(out, store)
    left = [p for p in (tmp_path / "trial").rglob("*") if p.name in ("checkpoint.pt", "best.pt", "pair.pt")]
    assert left == []


FAKE = '''"""A topology written by tests/test_topology_contract.py (deleted when the test ends)."""
from pathlib import Path

from .base import TOPOLOGIES
from .inline import Inline


@TOPOLOGIES.register("fake")
class Fake(Inline):
    name = "fake"
    priority = -1000  # never picked by auto

    def run(self, cfg, req):
        Path(req.out).mkdir(parents=True, exist_ok=True)
        (Path(req.out) / "ran-by-fake").write_text("1")
        return super().run(cfg, req)
'''


def test_a_topology_is_one_module(tmp_path):
    """A new module in orchestrator/topology/ is the whole change: configs accept its name and
    the grid's trial driver runs the pair through it (a real ``mergenet run``, real Ray and MLflow)."""
    from mlflow.tracking import MlflowClient

    module = ROOT / "orchestrator" / "topology" / "fake.py"  # a topology's module bears its name
    module.write_text(FAKE)
    try:
        grid = tiny_grid("g-fake", task=fmnist_task(160, 64), epochs=1, steps_per_epoch=2,
                         target_model={"name": "cnn", "options": {"channels": [4, 8], "hidden": 8}},
                         methods={"alone": {}}, seeds=[0], ray={"topology": "fake"})
        path = write_yaml(tmp_path / "grid.yaml", grid)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        run_cli("run", path, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600, check=0)
    finally:
        module.unlink(missing_ok=True)
    (trial,) = (tmp_path / "runs" / "grids" / "g-fake" / "trials").iterdir()
    assert (trial / "pair" / "ran-by-fake").exists()
    c = MlflowClient(uri)
    runs = [r for r in c.search_runs([c.get_experiment_by_name("g-fake").experiment_id])
            if r.data.tags.get("mergenet.trial") == "1"]
    assert [(r.info.status, r.data.tags["mergenet.topology"]) for r in runs] == [("FINISHED", "fake")]
    with pytest.raises(Exception, match="unknown topology 'fake'"):
        _cfg({"topology": "fake"})  # gone with its module
