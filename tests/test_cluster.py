"""Scale-out: every cluster YAML validates offline with Ray's own validator; a grid on a
3-node Ray cluster (``ray.cluster_utils.Cluster``) puts source and target on different worker
nodes (node ids recorded as MLflow tags); ``mergenet submit|logs|status|stop`` against a real
``ray start --head`` with the job server and token authentication.

Every Ray started here runs in its own temp dir (``RAY_TMPDIR``/``--temp-dir``) on its own
ports, and is stopped by PID (the processes this test started and their descendants):
never ``ray stop``, which would end every Ray instance on the machine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import (CLUSTER_GRID, FAST_ENV, ROOT, cli_env, free_port, ship_dir, short_tmp, stop_tree, tiny_grid,
                     write_yaml)

CLUSTER_YAMLS = sorted(ROOT.glob("cluster*.yaml"))


def mlflow_trials(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment} at {uri}"
    return c.search_runs([exp.experiment_id], "tags.`mergenet.trial` = '1'")


# --------------------------------------------------------------------------- (a) cluster YAMLs


def test_repo_has_aws_and_onprem_cluster_yamls():
    names = {p.name for p in CLUSTER_YAMLS}
    assert {"cluster.yaml", "cluster-onprem.yaml"} <= names, names


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_validates_offline(path):
    """Ray's own validator (the schema ``ray up`` uses), with no cloud call."""
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    cfg = prepare_config(raw)
    validate_config(cfg)

    text = path.read_text()
    # nothing secret in the file: no AWS keys, no literal Ray token
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|RAY_AUTH_TOKEN=", text), path
    # token auth on every node, the token copied from the launching machine's token file
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c or "ray stop" in c), starts
    # gloo bound to the interface that reaches the head on every node (not what the hostname resolves to)
    assert all("GLOO_SOCKET_IFNAME=$(ip -o " in c for c in starts if "ray start" in c), starts
    # the MLflow server on the head: sqlite backend, reachable from workers, job execution off
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "--backend-store-uri sqlite:" in head
    # no unauthenticated MLflow open to the network: a private bind, never all interfaces ...
    assert "0.0.0.0 --port 5000" not in head and re.search(r"--host (\$HEAD_IP|192\.168\.\d+\.\d+) --port 5000", head)
    # ... plus the firewall: AWS's security group (only in-group traffic), on-prem an iptables rule
    if raw["provider"]["type"] == "local":
        fw = " ".join(cfg["head_setup_commands"])
        assert "--dport 5000 -j MERGENET_MLFLOW" in fw and "-j DROP" in fw
        allowed = set(re.findall(r"for src in ([\d. ]+);", fw)[0].split())
        assert allowed == {"127.0.0.1", raw["provider"]["head_ip"], *raw["provider"]["worker_ips"]}
    else:
        assert "ray-autoscaler-mergenet" in text and "never add a rule opening 5000" in text
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head
    assert "MLFLOW_TRACKING_URI=http://" in head and "MERGENET_STORAGE_PATH=" in head
    # pinned versions, the same Ray as here (`ray up` requires it)
    setup = " ".join(cfg["setup_commands"])
    assert f'"ray[default,train,tune]=={ray.__version__}"' in setup
    assert "torch==2.13.0" in setup and "mlflow==3.17.2" in setup and "--python 3.11.7" in setup

    if raw["provider"]["type"] == "aws":
        types = raw["available_node_types"]
        head_type = types[raw["head_node_type"]]
        assert head_type["resources"].get("GPU", 0) == 0 and head_type["resources"]["CPU"] > 0
        gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
        per_node = sorted(t["resources"]["GPU"] for t in gpu_types.values())
        assert per_node[0] == 1 and per_node[-1] >= 2, per_node  # 1-GPU nodes and multi-GPU nodes
        for n, t in gpu_types.items():
            # a custom resource per GPU lets a grid pin its workers to a node type
            custom = {k: v for k, v in t["resources"].items() if k not in ("CPU", "GPU", "memory")}
            assert list(custom.values()) == [t["resources"]["GPU"]], (n, custom)
        assert str(raw.get("provider", {}).get("region", "")).strip()
        assert "MERGENET_STORAGE_PATH=$MERGENET_BUCKET/" in head and "MERGENET_BUCKET=s3://" in head
    else:
        assert raw["provider"]["type"] == "local"
        assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]


# --------------------------------------------------------------------------- (b) multi-node grid

MULTINODE = r'''
import json, os, subprocess, sys
from ray.cluster_utils import Cluster

grid = sys.argv[1]
mb = 1024 ** 2
local = {"object_store_memory": 200 * mb}
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "include_dashboard": False, "dashboard_port": int(sys.argv[2]), **local})
try:
    for _ in range(2):  # two "GPU" nodes: one accel slot each, like the 1-GPU AWS node type
        cluster.add_node(num_cpus=1, resources={"accel": 1}, **local)
    cluster.wait_for_nodes()
    info = {"address": cluster.address, "head": cluster.head_node.node_id,
            "workers": sorted(n.node_id for n in cluster.worker_nodes)}
    print("CLUSTER " + json.dumps(info), flush=True)
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", grid, "--address", cluster.address,
                        "--no-report"])
    print("DRIVER_RC", r.returncode, flush=True)
finally:
    cluster.shutdown()
'''


def test_grid_places_source_and_target_on_different_nodes(tmp_path):
    """Head (no accel) + 2 worker nodes with ``accel: 1``; the grid asks each pair worker for
    one ``accel`` with STRICT_SPREAD, so source and target must sit on different worker nodes
    and the adapter's factors cross nodes through the object store."""
    rtmp = short_tmp("mnb")
    grid = write_yaml(tmp_path / "grid.yaml", tiny_grid("mn-multinode", **CLUSTER_GRID, ray={
        "worker_resources": {"accel": 1}, "placement": "STRICT_SPREAD"}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = cli_env(**FAST_ENV, RAY_TMPDIR=str(rtmp), RAY_AUTH_MODE="disabled", MLFLOW_TRACKING_URI=uri, RAY_ADDRESS=None)
    log = tmp_path / "multinode.log"
    proc = subprocess.Popen([sys.executable, "-c", MULTINODE, str(grid), str(free_port())], cwd=tmp_path, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_tree([proc.pid], marker=str(rtmp))
        shutil.rmtree(rtmp, ignore_errors=True)
    text = log.read_text()
    assert "DRIVER_RC 0" in text, text[-6000:]
    info = json.loads(next(l for l in text.splitlines() if l.startswith("CLUSTER "))[len("CLUSTER "):])

    runs = mlflow_trials(uri, "mn-multinode")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED", run.data.tags.get("mergenet.failure_reason")
    src, tgt = run.data.tags.get("mergenet.node.source0"), run.data.tags.get("mergenet.node.target0")
    assert src and tgt, run.data.tags
    assert src != tgt  # different nodes ...
    assert {src, tgt} <= set(info["workers"]) and info["head"] not in (src, tgt)  # ... both "GPU" nodes
    assert run.data.metrics.get("adapter/transfers", 0) > 0  # factors went source -> adapter -> target
    placement = json.loads(next((tmp_path / "runs" / "grids" / "mn-multinode").rglob("placement.json")).read_text())
    assert {(w["role"], w["node_id"]) for w in placement} == {("source", src), ("target", tgt)}


# --------------------------------------------------------------------------- (c) Ray Jobs


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory):
    """A real ``ray start --head`` with the dashboard/job server, token auth with a token of
    its own, and — like cluster.yaml's head — MLFLOW_TRACKING_URI and MERGENET_STORAGE_PATH in
    its environment. Stopped by PID."""
    root = tmp_path_factory.mktemp("jobs")
    rtmp = short_tmp("mnc")
    token = rtmp / "token"
    token.write_text(os.urandom(16).hex())
    token.chmod(0o600)
    port, dash, client_port, agent = (free_port() for _ in range(4))
    env = cli_env(**FAST_ENV, RAY_TMPDIR=str(rtmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                  MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", MERGENET_STORAGE_PATH=str(root / "grids"),
                  RAY_ADDRESS=None, RAY_AUTH_TOKEN=None, PYTHONPATH=None)
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block", "--node-ip-address",
           "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client_port),
           "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2", "--object-store-memory", str(200 * 1024**2),
           "--temp-dir", str(rtmp / "ray"), "--disable-usage-stats"]
    log = root / "head.log"
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        import requests

        deadline = time.time() + 120
        while True:
            try:
                r = requests.get(address + "/api/version", timeout=2,
                                 headers={"Authorization": f"Bearer {token.read_text()}"})
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray head did not start:\n" + log.read_text()[-3000:])
            time.sleep(1)
        yield {"address": address, "token": token, "root": root, "uri": env["MLFLOW_TRACKING_URI"]}
    finally:
        stop_tree([proc.pid], marker=str(rtmp))
        shutil.rmtree(rtmp, ignore_errors=True)


def test_submit_rejects_a_bad_grid_before_contacting_the_cluster(tmp_path, capsys):
    from orchestrator.cli import main

    bad = tiny_grid("mn-bad", **CLUSTER_GRID)
    bad["pairs"][0]["layer_pairs"][0]["source"] = "nope.weight"
    path = write_yaml(tmp_path / "bad.yaml", bad)
    assert main(["submit", str(path), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope.weight" in err and "cannot reach" not in err, err


def test_client_without_the_token_gets_a_clear_error(job_cluster, monkeypatch, tmp_path):
    from mergenet_core.errors import MergenetError
    from orchestrator.cluster import submit

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    with pytest.raises(MergenetError, match="requires token authentication and no token was sent"):
        submit.client(job_cluster["address"])
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(MergenetError, match="token from RAY_AUTH_TOKEN was refused"):
        submit.client(job_cluster["address"])


def test_submit_runs_the_grid_as_a_ray_job(job_cluster, tmp_path, monkeypatch, capsys):
    """submit -> logs --follow -> status: SUCCEEDED, the run in the cluster's MLflow, the grid in
    the cluster's storage path; then stop on a running job."""
    from orchestrator.cli import main

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(job_cluster["token"]))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    addr = job_cluster["address"]
    wd = ship_dir(tmp_path, tiny_grid("mn-jobs", **CLUSTER_GRID))
    monkeypatch.chdir(wd)
    assert main(["submit", "experiments/grid.yaml", "--address", addr, "--python", sys.executable]) == 0
    out = capsys.readouterr().out
    job = re.search(r"submitted job (\S+):", out).group(1)
    assert f"{addr}/#/jobs/{job}" in out and f"mergenet logs {job}" in out, out

    assert main(["logs", job, "--address", addr, "--follow"]) == 0
    logs = capsys.readouterr().out
    assert "grid mn-jobs: 1 trials" in logs and '"failed": 0' in logs, logs[-4000:]
    assert str(job_cluster["root"] / "grids") in logs  # the cluster's MERGENET_STORAGE_PATH
    assert main(["status", job, "--address", addr, "--wait", "--timeout", "60"]) == 0
    assert f"{job}: SUCCEEDED" in capsys.readouterr().out
    assert main(["status", "--address", addr]) == 0
    assert job in capsys.readouterr().out

    runs = mlflow_trials(job_cluster["uri"], "mn-jobs")  # the cluster's MLFLOW_TRACKING_URI
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["adapter/transfers"] > 0
    assert (job_cluster["root"] / "grids" / "mn-jobs" / "mergenet_grid.json").exists()

    # stop: a long-running job of the same cluster ends STOPPED
    from orchestrator.cluster import submit

    c = submit.client(addr)
    sleeper = c.submit_job(entrypoint="sleep 300")
    deadline = time.time() + 60
    while c.get_job_status(sleeper).value == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert main(["stop", sleeper, "--address", addr]) == 0
    assert f"{sleeper}: stop requested; now STOPPED" in capsys.readouterr().out


def test_build_job_ships_the_working_dir_and_respects_grid_storage(tmp_path):
    from orchestrator.cluster.submit import EXCLUDES, build_job

    wd = ship_dir(tmp_path, tiny_grid("mn-build", **CLUSTER_GRID))
    job = build_job(wd / "experiments" / "grid.yaml", ["seeds=[0,1]"], working_dir=wd, mlflow_uri="http://h:5000",
                    deep=False)
    assert job["runtime_env"]["working_dir"] == str(wd) and job["runtime_env"]["excludes"] == EXCLUDES
    assert {"runs/", ".git", "mlflow.db"} <= set(EXCLUDES)
    env = job["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://h:5000" and env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert job["entrypoint"].startswith("python -m orchestrator.cli run experiments/grid.yaml --set 'seeds=[0,1]'")
    assert "${MERGENET_STORAGE_PATH:+" in job["entrypoint"]  # the cluster's storage, resolved on the head
    job2 = build_job(wd / "experiments" / "grid.yaml", ["storage_path=/mnt/shared/grids"], working_dir=wd, deep=False)
    assert "MERGENET_STORAGE_PATH" not in job2["entrypoint"]  # the grid's own storage_path wins
    job3 = build_job(wd / "experiments" / "grid.yaml", working_dir=wd, storage_path="/mnt/x", deep=False)
    assert job3["entrypoint"].endswith("--set storage_path=/mnt/x")
    from mergenet_core.errors import MergenetError

    with pytest.raises(MergenetError, match="inside the shipped working directory"):
        build_job(wd / "experiments" / "grid.yaml", working_dir=wd / "orchestrator", deep=False)
    # a plugin file travels with the job only from inside the working directory
    (tmp_path / "outside.py").write_text("")
    (wd / "experiments" / "inside.py").write_text("")
    build_job(wd / "experiments" / "grid.yaml", [f"plugins=[{wd / 'experiments' / 'inside.py'}]"], working_dir=wd,
              deep=False)
    with pytest.raises(MergenetError, match=r"^plugins: .*outside.py lies outside the shipped working directory"):
        build_job(wd / "experiments" / "grid.yaml", [f"plugins=[{tmp_path / 'outside.py'}]"], working_dir=wd,
                  deep=False)


def test_resume_job_points_mergenet_run_at_the_storage_folder(tmp_path):
    from orchestrator.cluster.submit import build_resume_job

    job = build_resume_job("/mnt/mergenet/grids/my grid", working_dir=tmp_path, python="/opt/venv/bin/python")
    assert job["entrypoint"] == "/opt/venv/bin/python -m orchestrator.cli run --resume '/mnt/mergenet/grids/my grid'"
    assert job["metadata"]["mergenet.grid"] == "my grid" and job["runtime_env"]["working_dir"] == str(tmp_path)


# --------------------------------------------------------------------------- (d) resource preflight


def _gpu_pair_and_plan():
    """A MergeNet pair (2 workers) asking for one GPU and one ``accel`` per worker, and its plan
    (built without data: only the worker count and the adapter matter to the check)."""
    from helpers import mergenet_options, tiny_pair
    from orchestrator.config import parse_config
    from orchestrator.topology.split.plan import PairPlan

    cfg = parse_config(tiny_pair("mergenet", mergenet_options(),
                                 ray={"use_gpu": True, "cpus_per_worker": 0.5, "worker_resources": {"accel": 1}}))
    return cfg, PairPlan(["target", "source"], False, {"link": None}, 1, None)


def test_resource_shortfall_is_refused_on_a_local_ray(ray_local, monkeypatch):
    """A Ray started in this process (like a plain `mergenet run` without --address) has no
    autoscaler: a pair it cannot hold is refused."""
    from mergenet_core.errors import ConfigError
    from orchestrator.cluster.connect import RESOURCE_CHECK_ENV
    from orchestrator.topology.split.plan import check_resources

    monkeypatch.delenv(RESOURCE_CHECK_ENV, raising=False)
    cfg, plan = _gpu_pair_and_plan()
    with pytest.raises(ConfigError, match=r"ray.worker_resources.accel: the pair needs 2 'accel' but the cluster has 0"):
        check_resources(cfg, plan)


ATTACHED = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import ray
from ray.cluster_utils import Cluster
from test_cluster import _gpu_pair_and_plan
from mergenet_core.errors import ConfigError
from orchestrator.cluster.connect import ensure_ray
from orchestrator.topology.split.plan import check_resources

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False,
                                                          "object_store_memory": 100 * 1024 ** 2})
try:
    ensure_ray(cluster.address)  # attached by address: the cluster may autoscale
    cfg, plan = _gpu_pair_and_plan()
    check_resources(cfg, plan)   # driver: warnings, no error

    @ray.remote(num_cpus=0.1)
    def in_a_worker():           # where a grid's trial runs the check
        try:
            check_resources(cfg, plan)
            return os.environ.get("MERGENET_RESOURCE_CHECK")
        except ConfigError as e:
            return f"refused: {e}"

    print("WORKER", ray.get(in_a_worker.remote()), flush=True)
    os.environ["MERGENET_RESOURCE_CHECK"] = "strict"  # the user's choice wins
    try:
        check_resources(cfg, plan)
        print("STRICT not refused", flush=True)
    except ConfigError as e:
        print("STRICT refused:", e, flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
'''


def test_resource_shortfall_only_warns_on_a_cluster_reached_by_address(tmp_path):
    """Attached to a running cluster by address (as `--address`, RAY_ADDRESS or a Ray job do),
    GPUs/custom resources the cluster lacks *now* may come from the autoscaler: one warning line
    per shortfall, in the driver and in the cluster's workers, and no refusal."""
    rtmp = short_tmp("mnw")
    env = cli_env(**FAST_ENV, RAY_TMPDIR=str(rtmp), RAY_AUTH_MODE="disabled", RAY_ADDRESS=None,
                  MERGENET_RESOURCE_CHECK=None)
    proc = subprocess.Popen([sys.executable, "-c", ATTACHED, str(Path(__file__).parent)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        stop_tree([proc.pid], marker=str(rtmp))
        shutil.rmtree(rtmp, ignore_errors=True)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    warnings = [l for l in err.splitlines() if l.startswith("warning: ")]
    assert any("ray.use_gpu: the pair needs 2 GPUs" in l and "autoscaler" in l for l in warnings), err[-3000:]
    assert any("ray.worker_resources.accel: the pair needs 2 'accel'" in l for l in warnings), err[-3000:]
    assert "WORKER warn" in out, out  # the setting reached the cluster's workers; they warned too
    assert "STRICT refused: ray.worker_resources.accel" in out, out
