"""Each trial of a grid resolved once (orchestrator/grid/spec.py): the points Tune runs, drawn
the same way each time a grid is resolved (a resumed grid finds its trials by key), each with
its validated config, its topology's resources and plan, and its MLflow names."""
from __future__ import annotations

from helpers import tiny_grid, write_yaml
from orchestrator.grid.load import load_grid
from orchestrator.grid.spec import resolve_all


def _grid(tmp_path, **extra):
    g = tiny_grid("g-spec", seeds=[0, 1], **extra)
    return load_grid(write_yaml(tmp_path / "grid.yaml", g), deep=False)


def test_every_trial_once_with_its_config_resources_and_names(tmp_path):
    grid = _grid(tmp_path, search={"recipe.optimizer.lr": {"grid": [0.01, 0.1]}}, ray={"topology": "split"})
    specs = resolve_all(grid)
    assert len(specs) == grid.trial_count() == len(grid.methods) * 2 * 2
    s = specs["cnn-cnn/alone/s1 recipe.optimizer.lr=0.1"]
    assert (s.pair, s.arm, s.seed, s.hp) == ("cnn-cnn", "alone", 1, {"recipe.optimizer.lr": 0.1})
    assert s.config.seed == 1 and s.config.target.recipe.optimizer.lr == 0.1
    assert s.topology == "split" and s.plan.layout == ["target"] and s.resources == ({"CPU": 0.01},)
    assert s.run_name == "alone s1 · cnn-cnn lr=0.1" and s.params["hp.recipe.optimizer.lr"] == "0.1"
    assert s.tags["mergenet.arm"] == "alone" and s.tags["mergenet.topology"] == "split"
    assert s.tune_config() == {"key": s.key, "hp": {"recipe.optimizer.lr": 0.1}}


def test_axes_that_share_a_short_name_stay_apart(tmp_path):
    """Every search value is in a trial's key, under its whole field (two axes that differ only in
    their first part, or a top-level one, have no shorter name of their own)."""
    grid = _grid(tmp_path, search={"source.recipe.optimizer.lr": {"grid": [0.01, 0.1]},
                                   "target.recipe.optimizer.lr": {"grid": [0.01, 0.1]}},
                 methods={"kd": {}, "dml": {}})
    assert len(resolve_all(grid)) == grid.trial_count() == 2 * 2 * 2 * 2


def test_random_axes_are_drawn_the_same_on_every_resolution(tmp_path):
    grid = _grid(tmp_path, search={"recipe.optimizer.lr": {"loguniform": [1e-4, 1e-1]}}, num_samples=3)
    first, again = resolve_all(grid), resolve_all(_grid(tmp_path, search={"recipe.optimizer.lr": {
        "loguniform": [1e-4, 1e-1]}}, num_samples=3))
    assert len(first) == grid.trial_count() == len(grid.methods) * 2 * 3
    assert [(k, s.hp) for k, s in first.items()] == [(k, s.hp) for k, s in again.items()]
    lrs = {s.hp["recipe.optimizer.lr"] for s in first.values()}
    assert len(lrs) == len(first) and all(1e-4 <= v <= 1e-1 for v in lrs)


def test_a_resume_refuses_a_folder_whose_trials_resolve_differently(tmp_path):
    """A resumed grid finds its trials by key: its folder records them (mergenet_trials.json), and a
    folder without that record (an older mergenet's) or with other trials is refused in one line."""
    import json

    import pytest

    from mergenet_core.errors import MergenetError
    from orchestrator.cluster.storage import Location
    from orchestrator.grid.spec import points
    from orchestrator.grid.tuner import GRID_FILE, TRIALS_FILE, _check_trials

    grid = _grid(tmp_path)
    folder = tmp_path / "runs" / "grids" / grid.grid
    folder.mkdir(parents=True)
    (folder / GRID_FILE).write_text(grid.model_dump_json())
    with pytest.raises(MergenetError, match="started by an older mergenet"):
        _check_trials(Location.parse(str(folder)), grid)
    rows = [{"pair": p, "arm": a, "seed": s, "hp": hp} for p, a, s, hp in points(grid)]
    (folder / TRIALS_FILE).write_text(json.dumps(rows))
    _check_trials(Location.parse(str(folder)), grid)
    (folder / TRIALS_FILE).write_text(json.dumps(rows[:-1]))
    with pytest.raises(MergenetError, match="resolve differently"):
        _check_trials(Location.parse(str(folder)), grid)
