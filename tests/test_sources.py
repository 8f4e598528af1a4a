"""A grid's ``sources:``: models trained before the trials, cached by a key over the config, the
data options and the code, reused when present, referred to by name in ``init_from``; checked
before anything trains (at the shapes the source will have), per-pair arm overrides."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import TINY_MODELS, fmnist_task, model_spec, tiny_grid, write_yaml
from mergenet_core.io.init_weights import PLANNED
from orchestrator.cli import main
from orchestrator.grid.load import load_grid
from orchestrator.grid.sources import is_trained, source_key, train_missing

TASK = fmnist_task(96, 32, val_fraction=None, val_size=32)
CNN = model_spec("cnn")


def _grid(tmp_path, **extra) -> dict:
    src = {"seed": 7, "target": {"model": copy.deepcopy(CNN), "task": copy.deepcopy(TASK)},
           "recipe": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64}, "device": "cpu"}
    g = tiny_grid("g-sources", task=TASK, epochs=1, steps_per_epoch=2, target_model=copy.deepcopy(CNN),
                  methods={"alone": {}, "transplant": {"layers": "all"}}, seeds=(0,),
                  sources={"donor": src}, storage_path=str(tmp_path / "runs" / "grids"), **extra)
    g["pairs"][0]["source"]["init_from"] = "sources:donor"
    return g


@pytest.fixture(autouse=True)
def _no_plans():
    PLANNED.clear()
    yield
    PLANNED.clear()


def test_untrained_source_validates_at_its_planned_shapes(tmp_path, capsys):
    path = write_yaml(tmp_path / "g.yaml", _grid(tmp_path))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    grid = load_grid(path, build=False)
    cfg = grid.trial_config("cnn-cnn", "transplant", 0)
    folder = grid.source_plan()[1]["donor"]
    assert cfg.source.init_from.path == str(folder) and not folder.exists()
    assert folder.parent == tmp_path / "runs" / "sources" and folder.name == f"donor-{source_key(grid.source_plan()[0]['donor'])}"


def test_a_source_whose_model_does_not_fit_is_refused_before_training(tmp_path, capsys):
    g = _grid(tmp_path)
    g["sources"]["donor"]["target"]["model"] = {"name": "cnn", "options": {**TINY_MODELS["cnn"], "hidden": 7}}
    path = write_yaml(tmp_path / "g.yaml", g)
    assert main(["validate", str(path)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "source.init_from" in err[0] and "source 'donor'" in err[0], err
    assert not (tmp_path / "runs" / "sources").exists()


@pytest.mark.parametrize("where, value, needle", [
    ("ref", "sources:nosuch", "pairs.0.source.init_from: unknown source 'nosuch' (grid sources: donor)"),
    ("name", "bad/name", "sources: name 'bad/name'"),
    ("field", 0, "sources.donor.recipe.epochs"),
    ("arm", None, "pairs[cnn-cnn].arms: no arm(s) ['kd']"),
])
def test_bad_sources_and_arm_overrides_are_one_line_each(tmp_path, capsys, where, value, needle):
    g = _grid(tmp_path)
    if where == "ref":
        g["pairs"][0]["source"]["init_from"] = value
    elif where == "name":
        g["sources"] = {value: g["sources"]["donor"]}
    elif where == "field":
        g["sources"]["donor"]["recipe"]["epochs"] = value
    else:
        g["pairs"][0]["arms"] = {"kd": {"seed": 3}}
    path = write_yaml(tmp_path / "g.yaml", g)
    assert main(["validate", str(path)]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert any(needle in l for l in err) and len(err) <= 2, err


def test_sources_train_once_then_are_reused_and_a_new_config_trains_anew(tmp_path):
    path = write_yaml(tmp_path / "g.yaml", _grid(tmp_path))
    grid = load_grid(path, build=False)
    configs, dirs = grid.source_plan()
    lines: list[str] = []
    first = train_missing(configs, dirs, log=lines.append)
    assert is_trained(dirs["donor"]) and "target/final_test_acc" in first["donor"]
    assert lines[0].startswith("source donor: trained in ")
    train_missing(configs, dirs, log=lines.append)
    assert lines[1].startswith(f"source donor: reused {dirs['donor']}")
    # the trial's source role starts from the trained donor (deep build: real weights)
    from mergenet_core.training.loop import PairState

    grid = load_grid(path)
    pair = PairState.build(grid.trial_config("cnn-cnn", "transplant", 0))
    saved = torch.load(dirs["donor"] / "checkpoint.pt", weights_only=True)["roles"]["target"]["model"]
    for k, v in pair.roles["source"].model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # another data option or seed: another key, another folder
    for change in ("sources.donor.seed=8", "sources.donor.target.task.options.train_subset=128"):
        other = load_grid(path, [change], build=False).source_plan()[1]["donor"]
        assert other != dirs["donor"] and other.parent == dirs["donor"].parent


def test_a_per_pair_arm_override_replaces_fields_for_that_arm_only(tmp_path):
    g = _grid(tmp_path)
    g["pairs"][0]["arms"] = {"transplant": {"source": {"model": {"name": "cnn", "options": {"channels": [4, 8]}},
                                                       "task": TASK}, "method.options.freeze": True}}
    grid = load_grid(write_yaml(tmp_path / "g.yaml", g), deep=False)
    t = grid.trial_config("cnn-cnn", "transplant", 0)
    assert t.source.model.options == {"channels": [4, 8]} and t.source.init_from is None
    assert t.method.options["freeze"] is True
    assert grid.trial_config("cnn-cnn", "alone", 0).source is None


def test_a_planned_source_is_never_loaded_as_nothing_outside_validation(tmp_path):
    """Deep validation checks a not-yet-trained source at its planned shapes; a real build of the
    same trial (outside validation) refuses it instead of starting from an untrained model."""
    from mergenet_core.errors import ConfigError
    from mergenet_core.training.loop import PairState

    path = write_yaml(tmp_path / "g.yaml", _grid(tmp_path))
    grid = load_grid(path)  # deep: the trial is built inside validation
    with pytest.raises(ConfigError, match="source 'donor' is not trained yet"):
        PairState.build(grid.trial_config("cnn-cnn", "transplant", 0))


def test_sources_in_dotted_arm_overrides_are_resolved(tmp_path):
    g = _grid(tmp_path)
    g["pairs"][0]["arms"] = {"transplant": {"source.init_from": "sources:donor"}}
    grid = load_grid(write_yaml(tmp_path / "g.yaml", g), deep=False)
    folder = grid.source_plan()[1]["donor"]
    assert grid.trial_config("cnn-cnn", "transplant", 0).source.init_from.path == str(folder)


# --------------------------------------------------------------------------- donors and validation examples


def _pooled(task: dict, pool: int | None) -> dict:
    t = copy.deepcopy(task)
    t["options"].pop("val_pool", None)
    if pool is not None:
        t["options"]["val_pool"] = pool
    return t


@pytest.mark.parametrize("pool", [None, 200])
def test_overlap_counts_the_donors_training_examples_among_the_targets_validation(tmp_path, capsys, pool):
    """Without a shared ``val_pool`` the donor (96 examples of 60,000) may train on a target's
    validation examples and validation warns, naming the field; with one the two are disjoint by
    construction: no warning, and `mergenet overlap` counts 0 (by content)."""
    g = _grid(tmp_path)
    g["seeds"] = [0, 1, 2]
    big = {"name": "fashion_mnist", "options": {"train_subset": 30000, "val_size": 100, "test_subset": 32}}
    g["sources"]["donor"]["target"]["task"] = _pooled(big, pool)  # a donor that sees half the training set
    for role in ("source", "target"):
        g["pairs"][0][role]["task"] = _pooled(TASK, pool)
    path = write_yaml(tmp_path / "g.yaml", g)
    assert main(["validate", str(path)]) == 0
    warned = [l for l in capsys.readouterr().err.splitlines() if "val_pool" in l]
    assert bool(warned) == (pool is None), warned
    if warned:
        assert "sources.donor.target.task.options.val_pool" in warned[0]
    out = tmp_path / "R.md"
    assert main(["overlap", str(path), "--results-md", str(out)]) == 0
    row = next(l for l in out.read_text().splitlines() if l.startswith("| `g.yaml`"))
    val, test = [c.strip() for c in row.split("|")[6:8]]
    assert test == "0 of 32"
    if pool is None:  # about half of 32 validation examples: 30,000 of 60,000 trained
        lo, hi = map(int, val.split(" of ")[0].split("–"))
        assert 5 <= lo <= hi <= 27 and val.endswith("of 32")
    else:
        assert val == "0 of 32"
