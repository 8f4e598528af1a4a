"""A real ``ray up`` (local provider) on this machine, then ``mergenet submit`` to it.

Slow and privileged, so it runs only when asked for: ``python -m pytest -m slow
tests/test_ray_up.py`` as root with ``openssh-server``, ``rsync`` and ``iproute2`` installed
(``apt-get install -y openssh-server rsync iproute2``).

The "cluster": a head host = an sshd on a veth address of this machine, and one worker host =
an sshd inside a network namespace (``ip netns`` + a veth pair), so the worker's Ray really
talks to the head over a network link. Both sshds run with their own config, host key,
authorized key and ``HOME`` (a temp folder), so nothing in ``/root`` is touched. ``ray up``
starts, like ``cluster-onprem.yaml``: token auth (the token copied by ``file_mounts``), an MLflow
server on the head (sqlite, job execution off), and exports ``MLFLOW_TRACKING_URI`` and
``MERGENET_STORAGE_PATH``. The test submits the quickstart grid (``experiments/quickstart.yaml``
when it exists, else a tiny grid whose source and target must sit on different hosts), waits
for the job, reads the runs from the head's MLflow over HTTP, and stops every process it
started by PID (never ``ray stop`` / ``ray down``), then deletes the namespace and the veth.
Traffic goes only to the addresses created here.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import (CLUSTER_GRID, FAST_ENV, ROOT, descendants, pids_with, run_cli, ship_dir, short_tmp, stop_pids,
                     tiny_grid)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # python, ray and mlflow of this environment
ONPREM_HEAD = "192.168.10.10"  # cluster-onprem.yaml's example head_ip


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow: real `ray up`; run with `python -m pytest -m slow tests/test_ray_up.py`")
    missing = [t for t in ("/usr/sbin/sshd", "rsync", "ssh", "ssh-keygen", "ip") if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"needs root and {missing or 'sshd, rsync, ip'} (apt-get install -y openssh-server rsync iproute2)")


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=60, **kw)


def _addresses_in_use() -> str:
    return _sh("ip", "-o", "addr").stdout


def _free_subnet() -> tuple[str, str]:
    used = _addresses_in_use()
    for _ in range(50):
        prefix = f"10.{random.randint(200, 254)}.{random.randint(0, 254)}"
        if f" {prefix}." not in used:
            return f"{prefix}.1", f"{prefix}.2"
    raise RuntimeError("no free 10.x.y.0/24 subnet")


def _port() -> int:
    return random.randint(20000, 29999)


SSHD = """ListenAddress {addr}
Port 22
HostKey {tmp}/hostkey
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
SetEnv HOME={tmp}/home
"""


class Hosts:
    """Head sshd on a veth address, worker sshd inside a network namespace."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        tag = tmp.name[-6:].lower().replace("_", "x")
        self.ns, self.veth_h, self.veth_w = f"mn{tag}", f"mn{tag}h", f"mn{tag}w"
        self.head, self.worker = _free_subnet()
        self.procs: list[subprocess.Popen] = []
        self.net_up = False

    def start(self) -> None:
        t = self.tmp
        (t / "home").mkdir()
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / "id"))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / "hostkey"))
        shutil.copy(t / "id.pub", t / "authorized_keys")
        # The head's autoscaler reaches the worker with `ssh -i ~/ray_bootstrap_key.pem`, and ssh
        # expands `~` to the passwd home (/root), not to our HOME: an `ssh` first on the head's
        # PATH adds our key, so nothing has to be written to /root.
        (t / "bin").mkdir()
        (t / "bin" / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -i {t}/id "$@"\n')
        (t / "bin" / "ssh").chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
        _sh("ip", "netns", "add", self.ns)
        self.net_up = True
        _sh("ip", "link", "add", self.veth_h, "type", "veth", "peer", "name", self.veth_w)
        _sh("ip", "link", "set", self.veth_w, "netns", self.ns)
        _sh("ip", "addr", "add", f"{self.head}/24", "dev", self.veth_h)
        _sh("ip", "link", "set", self.veth_h, "up")
        for args in (["addr", "add", f"{self.worker}/24", "dev", self.veth_w], ["link", "set", self.veth_w, "up"],
                     ["link", "set", "lo", "up"]):
            _sh("ip", "netns", "exec", self.ns, "ip", *args)
        for name, addr, prefix in (("head", self.head, []), ("worker", self.worker, ["ip", "netns", "exec", self.ns])):
            conf = t / f"sshd_{name}"
            conf.write_text(SSHD.format(addr=addr, tmp=t))
            self.procs.append(subprocess.Popen([*prefix, "/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                               stdout=(t / f"sshd_{name}.log").open("w"), stderr=subprocess.STDOUT))
        for addr in (self.head, self.worker):
            self.wait_ssh(addr)

    def ssh(self, addr: str, cmd: str) -> subprocess.CompletedProcess:
        return _sh("ssh", "-i", str(self.tmp / "id"), "-o", "StrictHostKeyChecking=no", "-o",
                   "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
                   f"root@{addr}", cmd, check=False)

    def wait_ssh(self, addr: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.ssh(addr, "true").returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"sshd on {addr} not reachable")

    def stop(self) -> None:
        stop_pids({p.pid for p in self.procs})
        if self.net_up:
            _sh("ip", "link", "del", self.veth_h, check=False)
            _sh("ip", "netns", "del", self.ns, check=False)


def cluster_config(h: Hosts, name: str, ports: dict) -> dict:
    """cluster-onprem.yaml, pointed at the two local "hosts", with its own ports and temp dirs."""
    t = h.tmp
    onprem = yaml.safe_load((ROOT / "cluster-onprem.yaml").read_text())
    env = " ".join(f"{k}={v}" for k, v in FAST_ENV.items())
    common = f"export PATH={t}/bin:{BIN}:$PATH RAY_TMPDIR={t} RAY_AUTH_MODE=token {env}"
    mlflow = (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup {BIN}/mlflow server --host {h.head} "
              f"--port {ports['mlflow']} --workers 1 --backend-store-uri sqlite:///{t}/home/mlflow/mlflow.db "
              f"--artifacts-destination {t}/home/mlflow/artifacts > {t}/home/mlflow/server.log 2>&1 < /dev/null &")
    # gloo's interface, as cluster-onprem.yaml picks it (here the hostname resolves to 127.0.0.1)
    gloo_head = next(c for c in onprem["head_start_ray_commands"] if "GLOO_SOCKET_IFNAME" in c)
    gloo_head = re.search(r"GLOO_SOCKET_IFNAME=\$\(.*?\)\)?[^ ;]*", gloo_head).group(0)
    gloo_worker = next(c for c in onprem["worker_start_ray_commands"] if "GLOO_SOCKET_IFNAME" in c)
    gloo_worker = re.search(r"GLOO_SOCKET_IFNAME=\$\(.*?/p'\)", gloo_worker).group(0)
    head = (f"{common} {gloo_head.replace(ONPREM_HEAD, h.head)} "
            f"MLFLOW_TRACKING_URI=http://{h.head}:{ports['mlflow']} MERGENET_STORAGE_PATH={t}/grids; "
            f"ray start --head --node-ip-address={h.head} --port={ports['gcs']} --dashboard-host={h.head} "
            f"--dashboard-port={ports['dashboard']} --ray-client-server-port={ports['client']} "
            f"--dashboard-agent-listen-port={ports['agent']} --num-cpus=2 --object-store-memory={300 * 1024**2} "
            f"--temp-dir={t}/ray --autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats")
    worker = (f"{common} {gloo_worker}; ray start --address=$RAY_HEAD_IP:{ports['gcs']} "
              "--node-ip-address=$(hostname -I | awk '{print $1}') "
              f"--dashboard-agent-listen-port={ports['agent']} --num-cpus=2 --object-store-memory={300 * 1024**2} "
              f"--temp-dir={t}/rayw --disable-usage-stats")
    return {
        "cluster_name": name,
        "provider": {"type": "local", "head_ip": h.head, "worker_ips": [h.worker]},
        "auth": {"ssh_user": "root", "ssh_private_key": str(t / "id")},
        # the token, copied to every host's ~/.ray/auth_token exactly as cluster-onprem.yaml does
        "file_mounts": {k: str(t / "token") for k in onprem["file_mounts"]},
        "setup_commands": ["chmod 600 ~/.ray/auth_token"],
        "head_setup_commands": ["mkdir -p ~/mlflow/artifacts"],
        "worker_setup_commands": [],
        # no `ray stop` here: on this machine it would end every Ray of every user session
        "head_start_ray_commands": [mlflow, head],
        "worker_start_ray_commands": [worker],
    }


def _http(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait(what: str, fn, timeout: float, every: float = 2.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            out = fn()
            if out:
                return out
        except Exception as e:  # noqa: BLE001 - keep polling, report the last problem
            last = e
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.mark.timeout(3600)
def test_ray_up_local_provider_submit_and_mlflow_over_http(tmp_path):
    t = short_tmp("mnu")
    ssh_dirs_before = set(Path("/tmp").glob("ray_ssh_*/*")) | set(Path("/tmp").glob("ray_ssh_*"))
    hosts = Hosts(t)
    ray_up = None
    name = f"mnu-{t.name[-6:].lower()}"
    try:
        hosts.start()
        (t / "token").write_text(os.urandom(16).hex())
        (t / "token").chmod(0o600)
        ports = {k: _port() for k in ("gcs", "dashboard", "client", "agent", "mlflow")}
        cfg_path = t / "cluster-local-test.yaml"
        cfg_path.write_text(yaml.safe_dump(cluster_config(hosts, name, ports), sort_keys=False))
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(yaml.safe_load(cfg_path.read_text())))

        env = dict(os.environ, RAY_UP_enable_autoscaler_v2="0", RAY_TMPDIR=str(t), TMPDIR=str(t),
                   HOME=str(t / "launcher"))
        env.pop("RAY_ADDRESS", None)
        (t / "launcher").mkdir()
        t0 = time.time()
        ray_up = subprocess.Popen([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(cfg_path)], env=env,
                                  stdout=(t / "ray_up.log").open("w"), stderr=subprocess.STDOUT, cwd=t)
        rc = ray_up.wait(timeout=300)
        up_log = (t / "ray_up.log").read_text()
        assert rc == 0, up_log[-5000:]
        print(f"ray up: {time.time() - t0:.0f} s")

        dashboard = f"http://{hosts.head}:{ports['dashboard']}"
        mlflow = f"http://{hosts.head}:{ports['mlflow']}"
        token = (t / "token").read_text()

        def two_nodes():
            import requests

            r = requests.get(dashboard + "/api/v0/nodes", timeout=5, headers={"Authorization": f"Bearer {token}"})
            alive = [n for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]
            return len(alive) >= 2 and alive
        nodes = _wait("the worker host to join", two_nodes, timeout=240)
        worker_ids = {n["node_id"] for n in nodes if n["node_ip"] == hosts.worker}
        assert worker_ids, [n["node_ip"] for n in nodes]
        print(f"cluster with worker: {time.time() - t0:.0f} s")
        _wait("the head's MLflow server",
              lambda: urllib.request.urlopen(mlflow + "/health", timeout=5).status == 200, timeout=60)

        # every pair's workers on different hosts, so MergeNet factors cross the veth link; one seed
        # of the quickstart by default (all three pairs, both methods), all of it with MERGENET_RAYUP_FULL=1
        sets = ["base.ray.placement=STRICT_SPREAD"]
        quick = ROOT / "experiments" / "quickstart.yaml"
        if quick.exists():
            wd, grid_rel = ROOT, "experiments/quickstart.yaml"
            if os.environ.get("MERGENET_RAYUP_FULL") != "1":
                sets.append("seeds=[0]")
        else:
            wd, grid_rel = ship_dir(tmp_path, tiny_grid("mn-rayup", **CLUSTER_GRID)), "experiments/grid.yaml"
        from orchestrator.grid.load import load_grid

        grid = load_grid(wd / grid_rel, sets, deep=False)
        grid_name = grid.grid
        sub_env = {"RAY_AUTH_TOKEN_PATH": str(t / "token"), "RAY_AUTH_TOKEN": None, "RAY_AUTH_MODE": None,
                   "RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": None}
        r = run_cli("submit", grid_rel, "--address", dashboard, *[a for kv in sets for a in ("--set", kv)],
                    cwd=wd, env=sub_env, timeout=300, check=0)
        job = re.search(r"submitted job (\S+):", r.stdout).group(1)
        r = run_cli("logs", job, "--address", dashboard, "--follow", cwd=wd, env=sub_env, timeout=1500)
        (t / "job.log").write_text(r.stdout + r.stderr)
        assert r.returncode == 0 and '"failed": 0' in r.stdout, r.stdout[-5000:] + r.stderr[-2000:]
        print(f"grid done: {time.time() - t0:.0f} s")

        exp = _http(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={grid_name}")["experiment"]
        runs = _http(f"{mlflow}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`mergenet.trial` = '1'"})["runs"]
        assert len(runs) == grid.trial_count() and all(r["info"]["status"] == "FINISHED" for r in runs), runs
        tags = [{t_["key"]: t_["value"] for t_ in r["data"]["tags"]} for r in runs]
        nodes_used = {v for tg in tags for k, v in tg.items() if k.startswith("mergenet.node.")}
        assert nodes_used & worker_ids, (nodes_used, worker_ids)  # work ran on the namespaced host
        split = [tg for tg in tags if "mergenet.node.source0" in tg]  # MergeNet trials: one role per host
        assert split and all(tg["mergenet.node.source0"] != tg["mergenet.node.target0"] for tg in split), split
        assert (t / "grids" / grid_name / "mergenet_grid.json").exists()  # the cluster's storage path
    finally:
        roots = [ray_up.pid] if ray_up else []
        pids = descendants(roots) | descendants(sorted(pids_with(str(t))))
        stop_pids(pids)
        hosts.stop()
        # ssh ControlPath folders that `ray up` and the head's autoscaler made for this cluster
        for d in sorted(set(Path("/tmp").glob("ray_ssh_*/*")) - ssh_dirs_before, reverse=True):
            shutil.rmtree(d, ignore_errors=True)
        for d in set(Path("/tmp").glob("ray_ssh_*")) - ssh_dirs_before:
            if not any(d.iterdir()):
                d.rmdir()
        if os.environ.get("MERGENET_KEEP_RAYUP_TMP") != "1":
            shutil.rmtree(t, ignore_errors=True)
