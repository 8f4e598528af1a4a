"""Grids on a real local Ray, tracked in a real `mlflow server` on 127.0.0.1 (sqlite backend),
checked through MLflow's REST API; interrupted grids resume without duplicate runs; malformed
grids are rejected with exit 2 before Ray starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import helpers
from helpers import free_port, write_yaml

TASK = {"name": "fashion_mnist", "options": {"train_subset": 320, "test_subset": 128, "val_fraction": 0.2}}


def tiny_grid(name: str, methods=None, seeds=(0, 1), **extra) -> dict:
    return helpers.tiny_grid(
        name, task=TASK, epochs=2, steps_per_epoch=3, target_model={"name": "cnn", "options": {"channels": [8], "hidden": 16}},
        methods=methods or {"alone": {}, "mergenet": {"t_cycle": 1, "adapter": {"layers": 1, "heads": 2}}},
        seeds=seeds, **{"max_concurrent_trials": 2, **extra})


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend), stopped by PID."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "1"],
        cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def api(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + "/api/2.0/mlflow/" + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def search_runs(url: str, exp_id: str, flt: str = "") -> list[dict]:
    return api(url, "runs/search", {"experiment_ids": [exp_id], "filter": flt, "max_results": 1000}).get("runs", [])


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def cli(args: list[str], cwd: Path, uri: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 600), **kw)


def test_grid_tracked_in_mlflow_server(mlflow_server, tmp_path):
    path = write_yaml(tmp_path / "grid.yaml", tiny_grid("g-server"))
    r = cli(["run", str(path)], tmp_path, mlflow_server)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "RUNNING" in r.stdout and "FINISHED" in r.stdout  # one line per state change
    assert "| cnn-cnn" in r.stdout  # the report table

    exp = api(mlflow_server, "experiments/get-by-name?experiment_name=g-server")["experiment"]
    runs = search_runs(mlflow_server, exp["experiment_id"])
    parents = [x for x in runs if tags(x).get("mergenet.kind") == "submission"]
    children = [x for x in runs if tags(x).get("mergenet.trial") == "1"]
    assert len(parents) == 1 and len(children) == 4
    parent_id = parents[0]["info"]["run_id"]
    assert {x["info"]["status"] for x in runs} == {"FINISHED"}
    combos = set()
    for ch in children:
        t = tags(ch)
        assert t["mlflow.parentRunId"] == parent_id
        assert t["mergenet.git_sha"] and t["mergenet.pair"] == "cnn-cnn"
        combos.add((t["mergenet.method"], t["mergenet.seed"]))
        params = {p["key"]: p["value"] for p in ch["data"]["params"]}
        assert params["method.name"] == t["mergenet.method"] and params["seed"] == t["mergenet.seed"]
        assert all(len(v) <= 500 for v in params.values())
        run_id = ch["info"]["run_id"]
        hist = api(mlflow_server, f"metrics/get-history?run_id={run_id}&metric_key=target/val_acc")["metrics"]
        assert sorted(m["step"] for m in hist) == [1, 2]
        if t["mergenet.method"] == "mergenet":
            for key in ("source/val_acc", "adapter/transfers", "adapter/grad_norm", "adapter/generate_ms"):
                h = api(mlflow_server, f"metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]
                assert len(h) == 2, key
            assert t["mergenet.node.source0"] and t["mergenet.node.target0"]
        files = {f["path"] for f in api(mlflow_server, f"artifacts/list?run_id={run_id}").get("files", [])}
        assert {"config.json", "final.json", "metrics.jsonl", "learning_curve.png"} <= files
    assert combos == {("alone", "0"), ("alone", "1"), ("mergenet", "0"), ("mergenet", "1")}
    rep = {f["path"] for f in api(mlflow_server, f"artifacts/list?run_id={parent_id}&path=report").get("files", [])}
    assert {"report/report.md", "report/trials.parquet", "report/mergenet_gain.png"} <= rep


def test_interrupted_grid_resumes_without_duplicate_runs(mlflow_server, tmp_path):
    grid = tiny_grid("g-resume", methods={"alone": {}}, seeds=(0, 1, 2), max_concurrent_trials=1,
                     base={"device": "cpu", "recipe": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 4,
                                                       "eval_batch_size": 256}})
    path = write_yaml(tmp_path / "grid.yaml", grid)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--no-report"], cwd=tmp_path,
                            env=env, stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    exp_id = None
    while time.time() < deadline:  # interrupt once the first trial has finished
        try:
            exp_id = exp_id or api(mlflow_server, "experiments/get-by-name?experiment_name=g-resume")["experiment"][
                "experiment_id"]
            done = [x for x in search_runs(mlflow_server, exp_id, "tags.`mergenet.trial` = '1'")
                    if x["info"]["status"] == "FINISHED"]
            if done:
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("no trial finished: " + (tmp_path / "first.log").read_text()[-3000:])
    os.killpg(proc.pid, signal.SIGKILL)  # everything the first submission started, by its process group
    proc.wait(timeout=30)
    time.sleep(2)
    before = search_runs(mlflow_server, exp_id, "tags.`mergenet.trial` = '1'")
    assert 1 <= len(before) < 4

    r = cli(["run", "--resume", str(tmp_path / "runs" / "grids" / "g-resume"), "--no-report"], tmp_path, mlflow_server)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    children = search_runs(mlflow_server, exp_id, "tags.`mergenet.trial` = '1'")
    seeds = sorted(tags(x)["mergenet.seed"] for x in children)
    assert seeds == ["0", "1", "2"], seeds  # every trial exactly once: no duplicate runs
    assert {x["info"]["status"] for x in children} == {"FINISHED"}
    parents = [x for x in search_runs(mlflow_server, exp_id) if tags(x).get("mergenet.kind") == "submission"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    for ch in children:
        hist = api(mlflow_server, f"metrics/get-history?run_id={ch['info']['run_id']}&metric_key=target/val_acc")
        assert sorted(m["step"] for m in hist["metrics"]) == [1, 2, 3]


@pytest.mark.parametrize("change, needle", [
    ({"pairs": [{"name": "p", "target": {"model": {"name": "cnn"}, "task": TASK}, "bogus": 1}]}, "pairs.0.bogus"),
    ({"search": {"recipe.optimizer.lr": {"loguniform": [-1, 0.1]}}}, "search.recipe.optimizer.lr"),
    ({"methods": {"nosuch": {}}}, "method.name"),
    ({"search": {"recipe.epochs": {"grid": [1, "many"]}}}, "recipe.epochs"),
    ({"pairs": [{"name": "p", "source": {"model": {"name": "cnn"}, "task": TASK},
                 "target": {"model": {"name": "cnn"}, "task": TASK},
                 "layer_pairs": [{"source": "missing.weight", "target": "classifier.weight"}]}]},
     "method.options.layer_pairs.0.source"),
    ({"scheduler": {"name": "asha", "metric": "target/val_accuracy"}}, "scheduler.metric"),
    ({"scheduler": {"name": "asha", "metric": "source/val_acc"}}, "scheduler.metric"),  # alone trains no source
])
def test_malformed_grid_rejected_before_ray(tmp_path, change, needle):
    grid = tiny_grid("g-bad")
    grid.update(change)
    path = write_yaml(tmp_path / "bad.yaml", grid)
    r = cli(["run", str(path)], tmp_path, f"sqlite:///{tmp_path / 'm.db'}", timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors and any(needle in l for l in errors), r.stderr
    assert "Traceback" not in r.stderr
    assert "Ray" not in r.stdout + r.stderr.replace(needle, "")  # Ray never started
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_every_grid_in_experiments_validates():
    from mergenet_core.config import read_yaml
    from orchestrator.cli import main

    grids = [p for p in sorted(Path(__file__).parents[1].joinpath("experiments").glob("*.yaml"))
             if "pairs" in read_yaml(p)]
    assert any(p.name == "quickstart.yaml" for p in grids)
    assert main(["validate", *map(str, grids)]) == 0
