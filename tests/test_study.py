"""The study ladder's files (experiments/study/): each setting is one grid that declares its
sources, its search on the validation split (`select:`, seeds disjoint from the verdict seeds),
at least five verdict seeds, its positive controls and the negative control of every MergeNet
arm, and writes its docs/RESULTS.md section; its pilot shares its sources and seeds nothing it
measures. Every grid validates -- the Fashion-MNIST and text ones on the real offline data, the
CIFAR-100 ones against a stand-in `cifar-100-python` folder. The study itself runs with
`mergenet run` (docs/RESULTS.md)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT
from mergenet_core.config import read_yaml

STUDY = ROOT / "experiments" / "study"
SETTINGS = {"a": "a_same_arch.yaml", "b": "b_same_family.yaml", "c": "c_cross_structure.yaml", "d": "d_text.yaml"}
WITHOUT_COTRAINED = {"d"}  # its co-trained 6-layer source would take the study past one session (d_text.yaml)
CIFAR = sorted(STUDY.glob("*_cifar100.yaml"))
GRIDS = sorted(p for p in STUDY.glob("*.yaml") if p not in CIFAR and "pairs" in read_yaml(p))


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_each_setting_declares_its_instrument(setting):
    g = read_yaml(STUDY / SETTINGS[setting])
    arms = g["methods"]
    assert {"alone", "transplant", "kd", "mergenet", "mergenet_untrained"} <= set(arms)
    assert arms["mergenet_untrained"]["control"] == "untrained_source"
    assert arms["mergenet"]["freeze_source"] is True
    searched = {"mergenet": ["mergenet_untrained"]}
    if setting not in WITHOUT_COTRAINED:
        assert {"mergenet_cotrained", "mergenet_shuffled", "param_share"} <= set(arms)
        assert arms["mergenet_shuffled"]["control"] == "shuffled_source"
        assert arms["mergenet_cotrained"]["freeze_source"] is False
        searched["mergenet_cotrained"] = ["mergenet_shuffled"]
    else:
        assert not {"mergenet_cotrained", "mergenet_shuffled", "param_share"} & set(arms)
    assert arms["kd"]["train_source"] is False  # the trained, frozen teacher
    assert len(g["seeds"]) >= 5 and g["sources"]
    sel = g["select"]
    assert not set(sel["seeds"]) & set(g["seeds"]) and "val" in sel.get("metric", "target/best_val_acc")
    assert sel["arms"] == searched
    assert len(sel["search"]["method.options.layer_pairs"]["grid"]) >= 3  # one layer, several, every one
    rep = g["report"]
    assert rep["verdicts"][0] == "mergenet:mergenet_untrained"  # the primary comparison comes first
    assert {"transplant", "kd"} <= set(rep["positive_controls"]) and rep["results_md"] == "docs/RESULTS.md"
    pilot = read_yaml(STUDY / f"{setting}_pilot.yaml")
    assert pilot["sources"] == g["sources"] and set(pilot["methods"]) == {"alone", "transplant", "kd"}
    assert not set(pilot["seeds"]) & (set(g["seeds"]) | set(sel["seeds"]))


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_study_grid_validates(path, capsys):
    from orchestrator.cli import main

    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    # no layer pair writes into an unnormalised layer
    assert "no normalisation layer" not in capsys.readouterr().err


def _cifar100_standin(root: Path) -> None:
    """A tiny folder in the official `cifar-100-python` pickle layout (random pixels)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 20)):
        labels = [int(v) for v in rng.integers(0, 100, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"filenames": [b"x.png"] * n, b"fine_labels": labels,
                         b"coarse_labels": [v // 5 for v in labels]}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f, protocol=2)


@pytest.mark.parametrize("path", CIFAR, ids=[p.name for p in CIFAR])
def test_cifar100_settings_validate_against_a_standin_folder(path, tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    assert CIFAR, "the ladder ships CIFAR-100 configs"
    g = read_yaml(path)
    assert "fashion_mnist" not in path.read_text() and g["grid"].endswith("cifar100")
    monkeypatch.setenv("MERGENET_DATA", str(tmp_path / "data"))  # the configs read $MERGENET_DATA
    assert main(["validate", str(path)]) == 2  # no data yet: a clear error, not a traceback
    assert f"CIFAR-100 not found at {tmp_path / 'data'}" in capsys.readouterr().err
    _cifar100_standin(tmp_path / "data")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


PAIR_CONFIGS = sorted(p for p in STUDY.glob("*.yaml") if "pairs" not in read_yaml(p))


@pytest.mark.parametrize("path", PAIR_CONFIGS, ids=[p.name for p in PAIR_CONFIGS])
def test_former_study_source_configs_validate(path, capsys):
    """The superseded study's source configs (docs/RESULTS.md, "Superseded") still validate."""
    from orchestrator.cli import main

    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_report_names_each_pairs_own_source_not_a_transplant_donor(tmp_path):
    """Setting (c)'s source is the trained ResNet-18; its transplant arm's donor (a MobileNetV2,
    a per-arm override) is listed with the per-arm settings, not as the pair's source."""
    from orchestrator.grid.load import load_grid
    from orchestrator.tracking.records import setting_lines

    f = tmp_path / "mergenet_grid.json"
    f.write_text(load_grid(STUDY / SETTINGS["c"], deep=False).model_dump_json())
    lines = setting_lines(None, "study-c", None, grid_file=f)
    source = next(l for l in lines if ", source: " in l)
    assert "`resnet18`" in source and "r18w16_fmnist_20k" in source, source
    assert any("per-arm settings" in l and "mobilenetv2" in l for l in lines)


def test_summary_carries_over_a_setting_this_store_never_ran(tmp_path, monkeypatch):
    """A setting whose MLflow records are not in this store keeps the rows the summary section
    held for it, marked carried over; a comparison against a `shuffled_source` arm is marked
    uninformative (the former row/column shuffle); a setting with no such rows reads 'not run yet'."""
    from helpers import mergenet_arm, tiny_grid, write_yaml
    from orchestrator.tracking.publish import write_section
    from orchestrator.tracking.summary import summary_markdown

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    arms = {"alone": {}, "mergenet_cotrained": mergenet_arm(),
            "mergenet_shuffled": {"method": "mergenet", **mergenet_arm(), "control": "shuffled_source"}}
    old = write_yaml(tmp_path / "b.yaml", tiny_grid("g-old", methods=arms))
    new = write_yaml(tmp_path / "z.yaml", tiny_grid("g-never", methods={"alone": {}}))
    md, title = tmp_path / "RESULTS.md", "Summary"
    write_section(md, title, "intro\n\n| setting | arm | a | b | c | verdict |\n|---|---|---|---|---|---|\n"
                  "| `b.yaml` | `mergenet_cotrained` | +0.1 [-0.5, +0.7] | -0.3 [-0.9, +0.3] (`mergenet_shuffled`) | 0.8 "
                  "| **not shown** (secondary) |\n| `b.yaml` | `mergenet_shuffled` | +0.2 [-0.7, +0.9] | – | 1.0 | "
                  "negative control |\n\n- `b.yaml` (`g-old`): 8 seeds; 72 of 72 trials finished\n")
    text = summary_markdown([old, new], (str(md), title))
    rows = [l for l in text.splitlines() if l.startswith("| `b.yaml` |")]
    assert len(rows) == 2 and "−" not in rows[0]
    assert rows[0].split(" | ")[3].endswith("(`mergenet_shuffled`) — uninformative: the former row/column shuffle "
                                            "(docs/METHOD.md, Controls)")
    assert rows[1].endswith("negative control (the former shuffle: uninformative) |")
    assert "- `b.yaml` (`g-old`): 8 seeds; 72 of 72 trials finished" in text
    assert "`b.yaml`: rows carried over" in text
    assert "| `z.yaml` | – | – | – | – | not run yet" in text
    write_section(md, title, text)  # carried again: marked once
    again = summary_markdown([old, new], (str(md), title))
    assert again.count("uninformative: the former") == 1 and again.count("rows carried over") == 1
