"""A researcher's own pair beside a built-in one, through ``mergenet run`` on a real local Ray with
MLflow (sqlite in the working directory) and the report: the source is a model registered by a
plugin file outside the repository, the target a torchvision MobileNetV2 (local weights file, no
download), the data an image folder written from Fashion-MNIST; the grid lives in the lab folder
and is run from another directory."""
from __future__ import annotations

import textwrap

import pytest

from helpers import fmnist_image_folder, fmnist_task, mergenet_arm, model_spec, run_cli, write_yaml
from test_plugins import LAB_PLUGIN

pytest.importorskip("PIL")


def _byo_grid(lab) -> dict:
    fmnist_image_folder(lab / "data" / "fm-folder", train_per_class=16, test_per_class=6)
    folder = {"name": "image_folder", "options": {"root": "data/fm-folder", "image_size": 32, "channels": 3,
                                                  "val_fraction": 0.25, "workers": 0}}
    tv = {"name": "torchvision", "options": {"name": "mobilenet_v2", "weights": "weights/mnv2.pt",
                                             "kwargs": {"width_mult": 0.35}}}
    small = fmnist_task(128, 64, val_fraction=0.25)
    return {
        "grid": "byo-mix",
        "plugins": ["lab_models.py"],
        "base": {"device": "cpu", "recipe": {"epochs": 1, "batch_size": 16, "steps_per_epoch": 2, "eval_batch_size": 128}},
        "pairs": [
            {"name": "builtin", "source": {"model": model_spec("cnn"), "task": small},
             "target": {"model": model_spec("cnn"), "task": small},
             "layer_pairs": [{"source": "classifier.weight", "target": "classifier.weight", "rank": 2}]},
            {"name": "lab-mnv2", "source": {"model": {"name": "lab_net", "options": {"hidden": 8}}, "task": folder},
             "target": {"model": tv, "task": folder},
             "layer_pairs": [{"source": "conv.weight", "target": "features.0.0.weight", "rank": 2}]},
        ],
        "methods": {"alone": {}, "kd": {}, "mergenet": mergenet_arm()},
        "seeds": [0],
        "resources": {"cpus_per_worker": 0.5},
        "max_concurrent_trials": 2,
    }


def test_a_grid_mixing_a_builtin_and_a_bring_your_own_pair_runs_and_reports(tmp_path):
    import torch

    from mergenet_core.models.vision import import_torchvision

    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "lab_models.py").write_text(textwrap.dedent(LAB_PLUGIN))
    (lab / "weights").mkdir()
    tv = import_torchvision()
    torch.save(tv.models.mobilenet_v2(width_mult=0.35).state_dict(), lab / "weights" / "mnv2.pt")  # 1000 classes
    grid = write_yaml(lab / "grid.yaml", _byo_grid(lab))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli("validate", grid, cwd=elsewhere, check=0)
    r = run_cli("run", grid, cwd=elsewhere, timeout=900, check=0)
    assert r.stdout.count(" FINISHED ") == 6, r.stdout[-3000:]
    assert "lab-mnv2" in r.stdout and "builtin" in r.stdout  # both pairs in the report's tables
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{elsewhere / 'mlflow.db'}")
    exp = client.get_experiment_by_name("byo-mix")
    runs = [x for x in client.search_runs([exp.experiment_id]) if x.data.tags.get("mergenet.pair")]
    assert sorted((x.data.tags["mergenet.pair"], x.data.tags["mergenet.arm"]) for x in runs) == sorted(
        (p, a) for p in ("builtin", "lab-mnv2") for a in ("alone", "kd", "mergenet"))
    assert all(x.info.status == "FINISHED" and "target/test_acc" in x.data.metrics for x in runs)


def test_a_hugging_face_pair_on_a_csv_table_trains_with_each_models_tokenizer(tmp_path):
    """Two Transformers models from a local folder (the MiniLM package's files: one pretrained
    classifier, one from its config alone) on a CSV of Rotten Tomatoes snippets with string labels;
    the table is tokenised by each model's own tokenizer unless the task names one. KD, one epoch."""
    import shutil

    import pyarrow as pa
    import pyarrow.csv as pacsv

    from mergenet_core.data.text import TextOptions, _rotten_tomatoes_raw, _rt_folder, minilm_path
    from orchestrator.config import load_config

    texts, labels = _rotten_tomatoes_raw(_rt_folder(TextOptions()))
    lab = tmp_path / "lab"
    (lab / "reviews").mkdir(parents=True)
    rows = list(range(0, 400, 2))
    t = pa.table({"review": [texts[i] for i in rows], "sentiment": ["rotten" if labels[i] else "fresh" for i in rows]})
    pacsv.write_csv(t.slice(0, 160), lab / "reviews" / "train.csv")
    pacsv.write_csv(t.slice(160), lab / "reviews" / "test.csv")
    shutil.copytree(minilm_path(), lab / "models" / "minilm")
    task = {"name": "text_table", "options": {"root": "reviews", "text_column": "review", "label_column": "sentiment",
                                              "max_length": 32, "val_fraction": 0.25}}
    cfg = write_yaml(lab / "pair.yaml", {
        "name": "hf-pair", "device": "cpu",
        "recipe": {"epochs": 1, "batch_size": 16, "steps_per_epoch": 2, "eval_batch_size": 64,
                   "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0}},
        "source": {"model": {"name": "hf", "options": {"path": "models/minilm", "head": "encoder"}}, "task": task},
        "target": {"model": {"name": "hf", "options": {"path": "models/minilm", "pretrained": False}}, "task": task},
        "method": {"name": "kd"}})
    parsed = load_config(cfg)
    assert parsed.target.task.options["tokenizer"] == str((lab / "models" / "minilm").resolve())  # the model's own
    assert parsed.target.task.options["root"] == str((lab / "reviews").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli("train", cfg, "--out", tmp_path / "out", "--quiet", cwd=elsewhere, timeout=600, check=0)
    import json

    final = json.loads((tmp_path / "out" / "final.json").read_text())
    assert 0.0 <= final["target/final_test_acc"] <= 1.0 and final["steps"] == 2


def test_transplant_between_torchvision_models_copies_the_donors_layers(tmp_path):
    """The positive control works on bring-your-own models: a torchvision ResNet-18 target takes the
    same-named layers of a torchvision ResNet-18 donor started from a local weights file."""
    import torch

    from mergenet_core.models.vision import import_torchvision
    from mergenet_core.training.loop import PairState
    from orchestrator.config import parse_config

    donor = import_torchvision().models.resnet18(num_classes=10)
    torch.save(donor.state_dict(), tmp_path / "donor.pt")
    task = {"name": "image_folder", "options": {"root": str(fmnist_image_folder(tmp_path / "fm", 6, 3)),
                                                "image_size": 32, "workers": 0}}
    cfg = parse_config({
        "device": "cpu", "recipe": {"epochs": 1, "batch_size": 8, "steps_per_epoch": 1},
        "source": {"model": {"name": "torchvision", "options": {"name": "resnet18", "weights": str(tmp_path / "donor.pt")}},
                   "task": task},
        "target": {"model": {"name": "torchvision", "options": {"name": "resnet18"}}, "task": task},
        "method": {"name": "transplant", "options": {"layers": ["layer1", "layer4.1.conv2.weight"]}}})
    pair = PairState.build(cfg)
    target = pair.roles["target"].model.state_dict()
    for name in ("layer1.0.conv1.weight", "layer1.1.bn2.running_var", "layer4.1.conv2.weight"):
        assert torch.equal(target[name], donor.state_dict()[name]), name
    assert not torch.equal(target["layer2.0.conv1.weight"], donor.state_dict()["layer2.0.conv1.weight"])
