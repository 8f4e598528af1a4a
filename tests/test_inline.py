"""Topology ``inline``: a grid trial whose pair fits one device trains inside the Tune trial
process (no Ray Train worker group); its metrics equal the single-process engine's."""
from __future__ import annotations

import json

import pytest

from helpers import RAY_GRID, assert_same_metrics, mergenet_arm, read_metrics, run_cli, tiny_grid, tiny_pair, write_yaml
from orchestrator.config import parse_config
from mergenet_core.training.engine import Engine


@pytest.mark.parametrize("ray,expected", [
    ({}, "inline"),
    ({"topology": "split"}, "split"),
    ({"use_gpu": True}, "split"),
    ({"target_workers": 2}, "split"),
    ({"placement": "STRICT_SPREAD"}, "split"),
    ({"worker_resources": {"accel": 1}}, "split"),
    ({"use_gpu": True, "topology": "inline"}, "inline"),
])
def test_auto_topology(ray, expected):
    from orchestrator.topology import choose

    cfg = parse_config(tiny_pair("alone", source_model=None, ray=ray))
    assert choose(cfg).name == expected


def test_inline_grid_trials_equal_the_engine_and_are_tracked(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.grid.load import load_grid

    grid = tiny_grid("g-inline", epochs=2, steps_per_epoch=3,
                     target_model={"name": "cnn", "options": {"channels": [8, 16], "hidden": 16}},
                     methods={"alone": {}, "mergenet": mergenet_arm()}, seeds=[0])
    grid["pairs"][0]["layer_pairs"] = [{"source": "features.1.conv.weight", "target": "features.1.conv.weight",
                                        "mode": "svd", "rank": 2}]
    path = write_yaml(tmp_path / "grid.yaml", grid)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cli("run", path, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600, check=0)
    g = load_grid(path, deep=False)
    folders = sorted((tmp_path / "runs" / "grids" / "g-inline" / "trials").iterdir())
    assert len(folders) == 2
    engine = {}  # arm -> (final.json, target/val_acc by epoch) of the single-process engine
    for folder in folders:
        cfg_json = json.loads((folder / "pair" / "config.json").read_text())
        arm = cfg_json["method"]["name"]
        ref = tmp_path / f"engine-{arm}"
        Engine(g.trial_config("cnn-cnn", arm, 0), ref, progress=False).run()
        assert_same_metrics(read_metrics(ref), read_metrics(folder / "pair"), tol=1e-6)
        engine[arm] = (json.loads((ref / "final.json").read_text()),
                       [(r["epoch"], r["target/val_acc"]) for r in read_metrics(ref)])
        placement = json.loads((folder / "pair" / "placement.json").read_text())
        assert [w["role"] for w in placement] == ["pair"]
        assert not (folder / "train").exists()  # no Ray Train run
        assert json.loads((folder / "pair" / "bundles.json").read_text())["last"]["epoch"] == 2
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("g-inline")
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("mergenet.trial") == "1"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mergenet.topology"] == "inline" for r in runs)
    assert sorted(r.data.tags["mergenet.method"] for r in runs) == ["alone", "mergenet"]
    for r in runs:  # what MLflow holds is the engine's numbers: the summary and the curve
        final, curve = engine[r.data.tags["mergenet.method"]]
        for k in ("target/final_test_acc", "target/test_acc_at_best_val"):
            assert r.data.metrics[k] == pytest.approx(final[k], abs=1e-6), k
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "target/val_acc"))
        assert [s for s, _ in hist] == [1, 2]
        assert [v for _, v in hist] == pytest.approx([v for _, v in curve], abs=1e-6)


@pytest.mark.parametrize("topology", ["inline", "split"])
def test_pbt_grid_finishes_with_whole_pair_bundles(tmp_path, topology):
    """PBT: segments of `perturbation_interval` epochs (in the trial process, or one TorchTrainer
    run each for the split topology), each reporting the pair bundle as its Tune checkpoint;
    every trial ends FINISHED with all epochs."""
    from mlflow.tracking import MlflowClient

    # 2 epochs: two segments, so a trial can exploit the other's bundle at the boundary (the split
    # topology starts one TorchTrainer run per segment: each epoch more costs ~20 s a trial here)
    grid = tiny_grid("g-pbt", epochs=2, steps_per_epoch=2,
                     target_model={"name": "cnn", "options": {"channels": [8], "hidden": 16}},
                     methods={"mergenet": mergenet_arm()}, seeds=[0, 1],
                     scheduler={"name": "pbt", "perturbation_interval": 1,
                                "hyperparam_mutations": {"recipe.optimizer.lr": {"loguniform": [0.01, 0.1]}}},
                     ray={"topology": topology})
    path = write_yaml(tmp_path / "grid.yaml", grid)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cli("run", path, "--no-report", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600, check=0)
    c = MlflowClient(uri)
    runs = [r for r in c.search_runs([c.get_experiment_by_name("g-pbt").experiment_id])
            if r.data.tags.get("mergenet.trial") == "1"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    # an exploit pauses a trial (SystemExit(0) in its process): never a failure, never a stop
    assert not [r.data.tags for r in runs if {"mergenet.failure_reason", "mergenet.stopped_by"} & set(r.data.tags)]
    assert all(r.data.tags["mergenet.topology"] == topology for r in runs)
    for folder in (tmp_path / "runs" / "grids" / "g-pbt" / "trials").iterdir():
        assert [r["epoch"] for r in read_metrics(folder / "pair")] == [1, 2]


def test_a_stopped_trial_ends_finished_with_the_epochs_it_ran(tmp_path):
    """What the driver writes for a trial Tune stopped (`end_stopped`): FINISHED, the summary of
    the epochs it ran (`final.json` too), the epoch it had no time to log added; the stop tagged
    only when it came before the recipe's last epoch."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking
    from orchestrator.cluster.storage import Location
    from orchestrator.grid.trial import end_stopped

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.ensure_experiment(c, "g-stop")
    cfg = parse_config(tiny_pair("alone", source_model=None, recipe={"epochs": 2}))
    for name, epochs in (("early", 1), ("complete", 2)):
        pair = tmp_path / name / "pair"
        pair.mkdir(parents=True)
        (pair / "config.json").write_text(cfg.model_dump_json())
        history = [{"epoch": e, "step": 2 * e, "target/val_acc": 0.1 * e, "target/test_acc": 0.2 * e,
                    "time/epoch_s": 1.0} for e in range(1, epochs + 1)]
        (pair / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        run = c.create_run(exp).info.run_id
        tracking.log_metrics(c, run, history[0], step=1)  # the last epoch is not logged yet
        end_stopped(c, run, Location.parse(tmp_path / name))
        r = c.get_run(run)
        assert r.info.status == "FINISHED" and "mergenet.failure_reason" not in r.data.tags
        assert r.data.metrics["target/test_acc_at_best_val"] == pytest.approx(0.2 * epochs)
        assert json.loads((pair / "final.json").read_text())["target/final_test_acc"] == pytest.approx(0.2 * epochs)
        assert sorted(m.step for m in c.get_metric_history(run, "target/val_acc")) == list(range(1, epochs + 1))
        stop = (r.data.tags.get(tracking.STOPPED_BY), r.data.tags.get(tracking.STOPPED_AT))
        assert stop == (("scheduler", "1") if epochs == 1 else (None, None))


def test_asha_grid_ends_finished_and_pairs(tmp_path):
    """ASHA stops every trial -- early at a rung, or at the recipe's last epoch -- before the
    trial function returns. That is a normal end: every run ends FINISHED with the summary of the
    epochs it ran and every epoch logged; one stopped early carries `mergenet.stopped_by =
    scheduler` and `mergenet.stopped_at_epoch`; and the report pairs the arms (at the common
    epoch, said in the report, when one stopped early)."""
    from mlflow.tracking import MlflowClient

    grid = tiny_grid("g-asha", **RAY_GRID, scheduler={"name": "asha", "metric": "target/val_acc"})
    path = write_yaml(tmp_path / "grid.yaml", grid)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_cli("run", path, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri}, timeout=600, check=0)
    c = MlflowClient(uri)
    runs = [x for x in c.search_runs([c.get_experiment_by_name("g-asha").experiment_id])
            if x.data.tags.get("mergenet.trial") == "1"]
    assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs), [x.info.status for x in runs]
    trials = tmp_path / "runs" / "grids" / "g-asha" / "trials"
    early = 0
    for x in runs:
        tags = x.data.tags
        epochs = [e["epoch"] for e in read_metrics(trials / tags["mergenet.trial_id"] / "pair")]
        assert "mergenet.failure_reason" not in tags and "target/test_acc_at_best_val" in x.data.metrics
        assert sorted(m.step for m in c.get_metric_history(x.info.run_id, "target/val_acc")) == epochs
        if epochs[-1] < 2:
            early += 1
            assert (tags["mergenet.stopped_by"], tags["mergenet.stopped_at_epoch"]) == ("scheduler", str(epochs[-1]))
        else:
            assert "mergenet.stopped_by" not in tags  # stopped at the recipe's last epoch: complete
    report = (tmp_path / "runs" / "reports" / "g-asha" / "report.md").read_text()
    assert "nothing to pair" not in report and "| mergenet | 2 |" in report, r.stdout[-3000:]
    assert ("every comparison of this pair is at epoch 1" in report) == (early > 0)
