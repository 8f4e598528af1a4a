"""Grid storage in a bucket: a real S3 endpoint (``moto_server`` on 127.0.0.1, plain HTTP) as
the grid's ``storage_path``. A real ``mergenet run`` (its own local Ray, MLflow in sqlite) is
killed after its first trial finished and resumed with ``--resume s3://...``: every trial
record (MLflow run id), Train checkpoint, final metrics and placement record is in the bucket
(listed through ``pyarrow.fs``), nothing is written to the local grid folder, and the resumed
grid re-attaches its runs instead of duplicating them.

pyarrow reaches the endpoint through the URI's query (``endpoint_override``, ``scheme``) and
takes the credentials from the environment, as on a cluster node (where they would come from
the instance profile instead).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import CLI, FAST_ENV, RAY_GRID, cli_env, free_port, run_cli, short_tmp, stop_tree, tiny_grid, write_yaml

BUCKET = "mergenet-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 endpoint (moto_server) with one bucket; stopped by PID. The module's process
    gets the (fake) credentials in its environment while it runs."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        raise RuntimeError("moto_server not found: pip install 'moto[server]>=5.2.2' (the test extra)")
    root = tmp_path_factory.mktemp("s3")
    port = free_port()
    log = root / "moto.log"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto_server did not start: " + log.read_text()[-2000:])
                time.sleep(0.3)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in S3_ENV.items():
                mp.setenv(k, v)
            import pyarrow.fs as pafs

            pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                              allow_bucket_creation=True).create_dir(BUCKET)
            yield {"endpoint": f"127.0.0.1:{port}",
                   "uri": lambda prefix: f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_locations_on_the_bucket_and_bad_uris(s3, tmp_path, monkeypatch):
    """The storage layer against the real endpoint: join, write/read, upload, list, move (a
    bucket has no rename), delete; malformed or unknown URIs are one-line errors (exit 2)."""
    from mergenet_core.errors import MergenetError
    from orchestrator.cli import main
    from orchestrator.cluster.storage import Location

    g = Location.parse(s3["uri"]("unit"))
    assert str(g / "a" / "b") == s3["uri"]("unit/a/b") and str((g / "a").parent) == s3["uri"]("unit")
    assert g.ray_storage()[0] == f"{BUCKET}/unit" and g.ray_storage()[1] is not None and g.local is None
    (g / "x" / "mlflow_run_id").write_text("abc")
    assert (g / "x" / "mlflow_run_id").read_text() == "abc" and (g / "x").exists() and not (g / "y").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "final.json").write_text("{}")
    (tmp_path / "d" / "pids").mkdir()
    (g / "x" / "pair").upload(tmp_path / "d", ["final.json", "absent.json"])
    assert g.listdir(recursive=True) == ["x", "x/mlflow_run_id", "x/pair", "x/pair/final.json"]
    (g / "x").move_to(g / "x.old")
    assert g.listdir() == ["x.old"] and (g / "x.old" / "pair" / "final.json").read_text() == "{}"
    g.delete()
    assert not g.exists()

    local = Location.parse(tmp_path / "grids")
    assert local.local == tmp_path / "grids" and local.ray_storage() == (str(tmp_path / "grids"), None)
    assert Location.parse(f"file://{tmp_path}/grids").local == tmp_path / "grids"
    for bad, needle in (("ftp://host/x", "unsupported scheme 'ftp://'"), ("s3:///nobucket", "names no bucket")):
        with pytest.raises(MergenetError, match=needle):
            Location.parse(bad)

    # through the CLI: exit 2, one line, before Ray or MLflow
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    # `mergenet run` sets RAY_AUTH_MODE (setdefault) for the local Ray it starts: set here so that
    # it is undone after this test, or the session's own local Ray (conftest.ray_local) would
    # start its GCS in token mode while this process's Ray client stays in the mode it read first
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    path = write_yaml(tmp_path / "bad.yaml", tiny_grid("g-bad-uri", **RAY_GRID, storage_path="ftp://host/grids"))
    assert main(["validate", str(path)]) == 2
    missing = s3["uri"]("nothing/here")
    assert main(["run", "--resume", missing, "--no-report"]) == 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_grid_in_a_bucket_is_killed_and_resumed_from_its_uri(s3, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.cluster.storage import Location

    storage = s3["uri"]("grids")
    grid_uri = s3["uri"]("grids/g-bucket")
    grid = tiny_grid("g-bucket", **(RAY_GRID | {"seeds": (0,), "max_concurrent_trials": 1}),  # alone + mergenet
                     storage_path=storage, ray={"topology": "split"})
    path = write_yaml(tmp_path / "grid.yaml", grid)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    rtmp = short_tmp("mnb3")
    env = {**FAST_ENV, **S3_ENV, "RAY_TMPDIR": str(rtmp), "RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_URI": uri,
           "MERGENET_RAY_DASHBOARD": "0", "RAY_ADDRESS": None}
    log = tmp_path / "first.log"
    # the client creates (migrates) the sqlite database as it starts: before the grid, not racing it
    c = MlflowClient(tracking_uri=uri)
    proc = subprocess.Popen([*CLI, "run", str(path), "--no-report"], cwd=tmp_path, env=cli_env(**env),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    first = None
    try:
        deadline = time.time() + 300
        while first is None:  # interrupt once the first trial has finished
            assert proc.poll() is None, "the grid ended before it was interrupted:\n" + log.read_text()[-4000:]
            assert time.time() < deadline, "no trial finished:\n" + log.read_text()[-4000:]
            time.sleep(1)
            if "grid g-bucket:" not in log.read_text():  # experiment and parent run created
                continue
            exp = c.get_experiment_by_name("g-bucket")
            done = [r for r in c.search_runs([exp.experiment_id], "tags.`mergenet.trial` = '1'")
                    if r.info.status == "FINISHED"]
            first = done[0] if done else None
    finally:
        stop_tree([proc.pid], marker=str(rtmp))  # the driver, its Ray and every worker, by PID
    text = log.read_text()
    assert f"storage {grid_uri}" in text, text[-3000:]
    exp_id = c.get_experiment_by_name("g-bucket").experiment_id
    before = c.search_runs([exp_id], "tags.`mergenet.trial` = '1'")
    assert 1 <= len(before) <= 2

    try:
        r = run_cli("run", "--resume", grid_uri, cwd=tmp_path, env=env, timeout=420)
    finally:
        stop_tree([], marker=str(rtmp))
        shutil.rmtree(rtmp, ignore_errors=True)
    (tmp_path / "resume.log").write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads(r.stdout[r.stdout.index("{\n"):r.stdout.index("\n}") + 2])
    assert summary["storage"] == grid_uri and summary["failed"] == 0
    assert "| cnn-cnn" in r.stdout  # the report, found through the bucket folder

    # MLflow: each trial exactly once, FINISHED; the finished run was kept, not duplicated
    children = c.search_runs([exp_id], "tags.`mergenet.trial` = '1'")
    assert sorted(x.data.tags["mergenet.method"] for x in children) == ["alone", "mergenet"]
    assert {x.info.status for x in children} == {"FINISHED"}
    assert first.info.run_id in {x.info.run_id for x in children}
    parents = [x for x in c.search_runs([exp_id]) if x.data.tags.get("mergenet.kind") == "submission"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == summary["parent_run_id"]

    # the bucket holds everything a resume or a user needs
    g = Location.parse(grid_uri)
    files = g.listdir(recursive=True)
    assert {"mergenet_grid.json", "mlflow_parent_run_id", "tuner.pkl"} <= set(files), files
    assert any(f.startswith("experiment_state-") for f in files)
    assert (g / "mlflow_parent_run_id").read_text() == summary["parent_run_id"]
    trials = (g / "trials").listdir()
    assert len(trials) == 2, trials
    by_run = {x.info.run_id: x for x in children}
    for t in trials:
        folder = g / "trials" / t
        run = by_run[(folder / "mlflow_run_id").read_text().strip()]  # the record names this trial's run
        assert run.data.tags["mergenet.trial_id"] == t
        inside = folder.listdir(recursive=True)
        ckpts = [f for f in inside if f.startswith("train/checkpoint_") and f.endswith("/pair.pt")]
        assert 1 <= len(ckpts) <= 2, inside  # the last and the best-validation bundle (one when they coincide)
        assert json.loads((folder / "pair" / "bundles.json").read_text())["last"]["epoch"] == 2
        final = json.loads((folder / "pair" / "final.json").read_text())
        assert final["target/final_test_acc"] == pytest.approx(run.data.metrics["target/final_test_acc"])
        history = [json.loads(l) for l in (folder / "pair" / "metrics.jsonl").read_text().splitlines() if l]
        assert [h["epoch"] for h in history] == [1, 2]
        assert final["epochs"] == 2 and final["target/final_test_acc"] == history[-1]["target/test_acc"]
        placement = json.loads((folder / "pair" / "placement.json").read_text())
        assert {f"mergenet.node.{w['role']}{w['role_rank']}": w["node_id"] for w in placement}.items() <= \
            run.data.tags.items()
        if run.data.tags["mergenet.method"] == "mergenet":
            assert sorted(w["role"] for w in placement) == ["source", "target"]
            assert run.data.metrics["adapter/transfers"] > 0
        assert {"config.json", "learning_curve.png"} <= set((folder / "pair").listdir())
        steps = {m.step for m in c.get_metric_history(run.info.run_id, "target/val_acc")}
        assert steps == {1, 2}  # the killed trial continued in the same run
    assert not (tmp_path / "runs" / "grids").exists()  # nothing went to the local default storage
