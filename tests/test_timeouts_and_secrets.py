"""Timeouts, not hangs; read-only commands create no files; no secrets in runtime envs; private
scratch folders. Real processes (the CLI in a subprocess), real sockets, real files."""
from __future__ import annotations

import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import fmnist_task, free_port, mergenet_options, run_cli, tiny_grid, tiny_pair, write_yaml

#: a one-step, alone-only grid (nothing of it should ever train)
GRID = {"task": fmnist_task(64, 32, val_fraction=None), "epochs": 1, "steps_per_epoch": 1,
        "target_model": {"name": "cnn"}, "methods": {"alone": {}}, "seeds": [0]}


def cli(*args: str, cwd: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI without a dashboard or a Ray address from the environment, and how long it took."""
    t0 = time.perf_counter()
    r = run_cli(*args, cwd=cwd, env={"MERGENET_RAY_DASHBOARD": "0", "RAY_ADDRESS": None}, timeout=timeout)
    return r, time.perf_counter() - t0


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[-20:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- dead Ray addresses


@pytest.mark.parametrize("address, needle", [
    (lambda: f"127.0.0.1:{free_port()}", "cannot reach"),       # nobody listens: refused at once
    (lambda: "ray://127.0.0.1:1", "cannot reach"),
    # unroutable: the connect timeout ("no answer"); on networks with a transparent proxy the TCP
    # connect succeeds and Ray's own handshake fails ("no Ray cluster answers"), after Ray has
    # logged its retries; either way one error line, in time
    (lambda: "10.255.255.1:6379", "no answer|no Ray cluster answers|cannot reach"),
], ids=["refused", "ray-client", "unroutable"])
def test_dead_ray_address_fails_within_30s_with_one_line(tmp_path, address, needle):
    import re

    cfg = write_yaml(tmp_path / "pair.yaml", tiny_pair("mergenet", mergenet_options()))
    addr = address()
    r, s = cli("train", str(cfg), "--ray", "--address", addr, "--out", str(tmp_path / "run"), "--quiet",
               cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "--address" in errors[0] and re.search(needle, errors[0]), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == errors[0]
    if "Ray cluster" not in errors[0]:  # the probe answered: nothing of Ray's ran, one line in all
        one_error_line(r, "--address")
    assert s < 30, s
    assert not (tmp_path / "run" / "pids").exists()


def test_grid_run_on_a_dead_address_creates_nothing(tmp_path):
    grid = write_yaml(tmp_path / "g.yaml", tiny_grid("dead", **GRID))
    r, s = cli("run", str(grid), "--address", f"127.0.0.1:{free_port()}", cwd=tmp_path, timeout=60)
    one_error_line(r, "cannot reach")
    assert s < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.yaml"]  # no mlflow.db, no runs/


# --------------------------------------------------------------------------- read-only commands


def test_read_only_commands_create_no_files(tmp_path):
    cfg = write_yaml(tmp_path / "pair.yaml", tiny_pair("mergenet", mergenet_options()))
    grid = write_yaml(tmp_path / "g.yaml", tiny_grid("ro", **GRID))
    before = sorted(p.name for p in tmp_path.iterdir())
    r, _ = cli("validate", str(cfg), str(grid), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r, _ = cli("pairs", "cnn", "resnet18", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r, _ = cli("report", "no-such-grid", cwd=tmp_path)
    one_error_line(r, "no MLflow database at", str(tmp_path / "mlflow.db"))
    r, _ = cli("report", str(tmp_path / "no-such-folder"), cwd=tmp_path)
    one_error_line(r, "no MLflow database")
    r, _ = cli("train", str(cfg), "--resume", "--out", str(tmp_path / "nope"), cwd=tmp_path)
    one_error_line(r, "--resume: no checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------- secrets


SECRETS = {"MLFLOW_TRACKING_PASSWORD": "hunter2", "MLFLOW_TRACKING_TOKEN": "tok-123", "MLFLOW_TRACKING_USERNAME": "me",
           "AWS_SECRET_ACCESS_KEY": "abc", "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000"}


def test_worker_runtime_env_is_an_allow_list_without_secrets():
    from orchestrator.cluster.connect import worker_env

    env = worker_env({**SECRETS, "MLFLOW_TRACKING_URI": "http://head:5000", "PATH": "/bin"})
    assert env["MLFLOW_TRACKING_URI"] == "http://head:5000"
    assert not set(SECRETS) & set(env) and "PATH" not in env
    assert not any(v in str(env) for v in SECRETS.values())


def test_tracking_uri_with_credentials_is_refused():
    from mergenet_core.errors import MergenetError
    from orchestrator.cluster.connect import worker_env

    with pytest.raises(MergenetError, match="holds credentials") as e:
        worker_env({"MLFLOW_TRACKING_URI": "https://me:hunter2@head:5000"})
    assert "hunter2" not in str(e.value)


def test_submit_refuses_secret_env_vars(tmp_path):
    from mergenet_core.errors import MergenetError
    from orchestrator.cluster.submit import check_job_env

    check_job_env({"TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": "http://h:5000"})
    for k in ("MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY"):
        with pytest.raises(MergenetError, match="looks like a secret") as e:
            check_job_env({k: "s3cr3t"})
        assert "s3cr3t" not in str(e.value)


def test_scratch_folders_are_private_and_unpredictable():
    import shutil
    import tempfile

    from orchestrator.cluster.storage import scratch_dir

    a, b = scratch_dir("grid", "trial_1"), scratch_dir("grid", "trial_1")
    try:
        assert a != b and a.parent == b.parent == Path(tempfile.gettempdir())
        assert stat.S_IMODE(a.stat().st_mode) == 0o700
        assert a.name.startswith("mergenet-grid-trial_1-") and len(a.name) > len("mergenet-grid-trial_1-") + 4
    finally:
        shutil.rmtree(a), shutil.rmtree(b)
