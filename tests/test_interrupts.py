"""Ctrl-C and SIGTERM tell the truth (orchestrator/interrupts.py): real signals to a real
``mergenet run`` (local Ray, sqlite MLflow) and ``mergenet train``; the MLflow end states the
driver writes on an interrupt, and how a resume re-attaches them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from helpers import CLI, cli_env, descendants, fmnist_task, run_cli, stop_pids, tiny_grid, tiny_pair, write_yaml
from orchestrator import tracking


def test_killed_run_stays_killed_and_resume_reattaches_it(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("e")
    run = tracking.attach_or_create(c, tmp_path / "trial", exp, "t", {})
    tracking.kill_run(c, run, "SIGINT")
    tracking.end_run(c, run, ok=False, reason="a trial process ending after the interrupt")
    r = c.get_run(run)
    assert r.info.status == "KILLED" and r.data.tags[tracking.STOPPED_BY] == "interrupt(SIGINT)"
    # a resume re-attaches the same run, no longer marked stopped; it may then finish
    assert tracking.attach_or_create(c, tmp_path / "trial", exp, "t", {}, reopen_finished=False) == run
    r = c.get_run(run)
    assert r.info.status == "RUNNING" and tracking.STOPPED_BY not in r.data.tags
    tracking.end_run(c, run, ok=True)
    assert c.get_run(run).info.status == "FINISHED"
    # a trial's finished run stays finished (the driver then reports its metrics); a parent re-opens
    assert tracking.attach_or_create(c, tmp_path / "trial", exp, "t", {}, reopen_finished=False) == run
    assert c.get_run(run).info.status == "FINISHED"
    tracking.attach_or_create(c, tmp_path / "trial", exp, "t", {})
    assert c.get_run(run).info.status == "RUNNING"



def test_a_run_whose_id_was_never_recorded_is_found_by_its_folder(tmp_path):
    """A process killed between creating its run and writing the run's id into its folder (seen in
    CI with a bucket folder) left a second run of the same trial on resume."""
    from orchestrator.cluster.storage import Location

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("e")
    folder = tmp_path / "trial"
    where = str(Location.parse(folder))
    orphan = c.create_run(exp, run_name="t", tags={tracking.FOLDER_TAG: where}).info.run_id
    assert tracking.attach_or_create(c, folder, exp, "t", {}) == orphan
    assert (folder / tracking.RUN_ID_FILE).read_text() == orphan
    # a run of the folder that holds something is an earlier run of a folder since emptied: kept apart
    c.log_param(orphan, "seed", "0")
    (folder / tracking.RUN_ID_FILE).unlink()
    fresh = tracking.attach_or_create(c, folder, exp, "t", {})
    assert fresh != orphan and c.get_run(fresh).data.tags[tracking.FOLDER_TAG] == where

def _grid(tmp_path, name: str, seeds, epochs: int = 3) -> tuple:
    # trials of several seconds each (2,000 images, 62 steps per epoch): the signal lands inside one
    grid = tiny_grid(name, task=fmnist_task(train=2000, test=256), methods={"alone": {}}, seeds=seeds, epochs=epochs,
                     steps_per_epoch=None,
                     max_concurrent_trials=1, resources={"cpus_per_worker": 1})
    path = write_yaml(tmp_path / "grid.yaml", grid)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return path, uri


def _start(cmd: list, tmp_path, uri: str, log: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, cmd)], cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=uri),
                            stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(tmp_path, log: str, pattern: str, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, (tmp_path / log).read_text()):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    _cleanup(proc)
    raise AssertionError(f"no {pattern!r}: " + (tmp_path / log).read_text()[-3000:])


def _cleanup(proc) -> None:
    """Whatever the driver left (the local Ray it started), by its process tree and group."""
    stop_pids(descendants([proc.pid]) | {proc.pid}, grace=5.0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_for_trial_run(uri: str, name: str, proc, timeout: float = 120) -> None:
    """Until a trial's MLflow run is RUNNING (Tune says RUNNING before the trial process has
    opened its run: a signal then would find no trial run to mark KILLED)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r.info.status == "RUNNING" for r in _runs(uri, name)[0]):
                return
        except Exception:  # noqa: BLE001 - the experiment or the database not there yet
            pass
        time.sleep(0.3)
    _cleanup(proc)
    raise AssertionError("no RUNNING trial run")


def _runs(uri: str, name: str):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("mergenet.trial") == "1"]
    parents = [r for r in runs if r.data.tags.get("mergenet.kind") == "submission"]
    return trials, parents


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_grid_is_killed_and_resumes(tmp_path, sig, code):
    name = f"g-int-{sig.name.lower()}"
    # 8 epochs: the signalled trial cannot finish inside Tune's stop window (up to 10 s before its
    # process is force-killed), where it would rightly end FINISHED and leave nothing KILLED
    path, uri = _grid(tmp_path, name, seeds=(0, 1, 2) if sig == signal.SIGINT else (0, 1), epochs=8)
    proc = _start(["run", path, "--no-report"], tmp_path, uri, "first.log")
    _wait_for(tmp_path, "first.log", r"\] RUNNING ", proc)
    _wait_for_trial_run(uri, name, proc)  # inside the first trial: its MLflow run is open
    os.kill(proc.pid, sig)  # the driver only, as `kill` or a terminal's Ctrl-C reach it
    try:
        rc = proc.wait(timeout=90)
    finally:
        _cleanup(proc)
    out = (tmp_path / "first.log").read_text()
    assert rc == code, out[-3000:]
    last = out.strip().splitlines()[-1]
    total = 3 if sig == signal.SIGINT else 2
    assert re.fullmatch(rf"interrupted \({sig.name}\): \d of {total} trials finished; resume: mergenet run "
                        rf"--resume \S*runs/grids/{name}", last), last
    assert "Tuner.restore" not in out and '"trials":' not in out  # no Tune hint, no summary as if done
    time.sleep(12)  # past Tune's force-kill of the trial processes: nothing they write undoes KILLED
    trials, parents = _runs(uri, name)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert "RUNNING" not in {r.info.status for r in trials}
    killed = [r for r in trials if r.info.status == "KILLED"]
    assert killed and all(r.data.tags[tracking.STOPPED_BY] == f"interrupt({sig.name})" for r in killed)
    if sig != signal.SIGINT:
        return
    r = run_cli("run", "--resume", tmp_path / "runs" / "grids" / name, "--no-report", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": uri}, timeout=600, check=0)
    trials, parents = _runs(uri, name)
    assert sorted(t.data.tags["mergenet.seed"] for t in trials) == ["0", "1", "2"]  # KILLED re-attached, no duplicates
    assert {t.info.status for t in trials} == {"FINISHED"} and [p.info.status for p in parents] == ["FINISHED"]
    c = MlflowClient(uri)
    for t in trials:
        assert tracking.STOPPED_BY not in t.data.tags
        assert sorted(m.step for m in c.get_metric_history(t.info.run_id, "target/val_acc")) == list(range(1, 9))


def test_second_ctrl_c_exits_at_once(tmp_path):
    path, uri = _grid(tmp_path, "g-int-twice", seeds=(0, 1))
    proc = _start(["run", path, "--no-report"], tmp_path, uri, "run.log")
    _wait_for(tmp_path, "run.log", r"\] RUNNING ", proc)
    _wait_for_trial_run(uri, "g-int-twice", proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)  # while the trials are still stopping
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    try:
        rc = proc.wait(timeout=30)
    finally:
        _cleanup(proc)
    assert rc == 130 and time.time() - t0 < 10, (tmp_path / "run.log").read_text()[-3000:]
    time.sleep(12)
    trials, parents = _runs(uri, "g-int-twice")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert "RUNNING" not in {r.info.status for r in trials}


def test_interrupted_train_says_how_to_resume(tmp_path):
    cfg = write_yaml(tmp_path / "pair.yaml", tiny_pair("alone", source_model=None,
                                                        recipe={"epochs": 40, "steps_per_epoch": 4}))
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "train", str(cfg), "--out", str(out), "--quiet"], cwd=tmp_path, env=cli_env(),
                            stdout=open(tmp_path / "train.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.wait(timeout=60)
    text = (tmp_path / "train.log").read_text()
    assert rc == 130, text[-3000:]
    m = re.fullmatch(r"interrupted \(SIGINT\): (\d+) of 40 epochs finished; resume: mergenet train (\S+) "
                     r"--out (\S+) --resume", text.strip().splitlines()[-1])
    assert m and 1 <= int(m.group(1)) < 40 and m.group(3) == str(out), text[-2000:]
    r = run_cli("train", cfg, "--out", out, "--quiet", "--resume", cwd=tmp_path, timeout=300, check=0)
    assert '"epochs": 40' in r.stdout
