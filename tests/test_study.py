"""The controlled study's files (experiments/study/): every grid validates (deep: data, models,
layer pairs, init_from shapes) against a stand-in for the trained source it names, and the
source configs validate as pair configs. The study itself runs with `mergenet run` (docs/RESULTS.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import limit_threads
from mergenet_core.config import read_yaml

limit_threads()
STUDY = Path(__file__).resolve().parents[1] / "experiments" / "study"
GRIDS = sorted(p for p in STUDY.glob("*.yaml") if "pairs" in read_yaml(p))


def _source_standin(grid: dict, folder: Path) -> Path:
    """A state_dict of the grid's source architecture (untrained): what init_from needs to validate."""
    from mergenet_core.data import build_task
    from mergenet_core.models import build_model

    src = grid["base"]["source"]
    info = build_task(src["task"]["name"], src["task"]["options"], seed=0).info
    model = build_model(src["model"]["name"], src["model"].get("options", {}), info)
    path = folder / "source.pt"
    torch.save(model.state_dict(), path)
    return path


def test_study_has_both_settings_with_controls_and_five_seeds():
    names = {p.name for p in GRIDS}
    assert {"fmnist_grid.yaml", "rt_grid.yaml", "fmnist_lr.yaml", "rt_lr.yaml"} <= names
    for name in ("fmnist_grid.yaml", "rt_grid.yaml"):
        g = read_yaml(STUDY / name)
        assert len(g["seeds"]) >= 5
        arms = g["methods"]
        assert {"alone", "dml", "param_share", "mergenet", "mergenet_untrained", "mergenet_shuffled"} <= set(arms)
        assert arms["mergenet_untrained"]["control"] == "untrained_source"
        assert arms["mergenet_shuffled"]["control"] == "shuffled_source"
        assert "init_from" in g["base"]["source"]


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_study_grid_validates_against_a_source_standin(path, tmp_path, capsys):
    from orchestrator.cli import main

    standin = _source_standin(read_yaml(path), tmp_path)
    assert main(["validate", str(path), "--set", f"base.source.init_from={standin}"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    # only the authors' own pairing may warn (it writes a full matrix); no unnormalised target
    assert "no normalisation layer" not in err
