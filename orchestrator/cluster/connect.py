"""Reaching Ray: the environment our workers get, attaching to (or starting) a Ray, and the
check that the connected cluster can hold a pair now."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import ray

from mergenet_core.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.config import PairConfig
    from orchestrator.pair import PairPlan

#: environment every Ray worker of ours gets
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

#: ``strict``: refuse a pair the cluster cannot hold now; ``warn``: print one line and go on
#: (the autoscaler may add the nodes). ``ensure_ray`` sets ``warn`` when it attaches to a
#: cluster by address, unless the user set it; a Ray started here (or in-process) stays strict.
RESOURCE_CHECK_ENV = "MERGENET_RESOURCE_CHECK"


#: MLflow settings a worker needs; nothing else of the environment is forwarded (credentials
#: such as MLFLOW_TRACKING_PASSWORD / _TOKEN stay where they are: workers read them from the
#: node's own environment or ``~/.mlflow/credentials``, never from a runtime env)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
                 RESOURCE_CHECK_ENV)

#: seconds to reach a Ray address before giving up (a dead address otherwise waits minutes)
CONNECT_TIMEOUT_S = 10.0


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The env vars every Ray worker of ours gets: :data:`WORKER_ENV` and the allow-listed
    :data:`FORWARDED_ENV`; a tracking URI carrying ``user:password@`` is refused."""
    from orchestrator.cluster.secrets import check_no_credentials

    environ = os.environ if environ is None else environ
    env = {**WORKER_ENV, **{k: environ[k] for k in FORWARDED_ENV if k in environ}}
    for k, v in env.items():
        check_no_credentials(k, v)
    return env


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a local Ray bound to 127.0.0.1.
    An address nobody answers on fails within :data:`CONNECT_TIMEOUT_S` with one line."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.setdefault(RESOURCE_CHECK_ENV, "warn")  # a cluster reached by address may autoscale
    env = {"env_vars": worker_env()}
    if address:
        from orchestrator.cluster.secrets import probe_address

        probe_address(address, CONNECT_TIMEOUT_S)
        # something answers: give Ray's own GCS handshake a bounded number of 1 s attempts too
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(CONNECT_TIMEOUT_S)))
        try:
            ray.init(address=address, runtime_env=env, **init_kwargs)
        except (ConnectionError, TimeoutError) as e:
            from mergenet_core.errors import MergenetError, short

            raise MergenetError(f"--address {short(address)}: no Ray cluster answers there "
                                f"({short(str(e).splitlines()[0] if str(e) else type(e).__name__, 100)})") from None
    else:
        init_kwargs.setdefault("include_dashboard", os.environ.get("MERGENET_RAY_DASHBOARD", "1") != "0")
        ray.init(address="local", dashboard_host="127.0.0.1", runtime_env=env, **init_kwargs)


def check_resources(cfg: PairConfig, plan: PairPlan) -> None:
    """Refuse a pair that the connected cluster cannot hold now — on a Ray started here. On a
    cluster reached by address (``MERGENET_RESOURCE_CHECK=warn``, see :data:`RESOURCE_CHECK_ENV`)
    the autoscaler may still add the nodes: print one warning line per shortfall instead (Ray
    Train then waits for the resources)."""
    total = ray.cluster_resources()
    rs = cfg.ray
    problems: list[ConfigError] = []
    need_cpu = plan.num_workers * rs.cpus_per_worker + (rs.adapter.num_cpus if plan.exchange_spec is not None else 0)
    if need_cpu > total.get("CPU", 0) + 1e-9:
        problems.append(ConfigError("ray.cpus_per_worker", f"the pair needs {need_cpu:g} CPUs ({plan.num_workers} "
                                    f"workers x {rs.cpus_per_worker:g}) but the cluster has {total.get('CPU', 0):g}"))
    for res, amount in rs.worker_resources.items():
        need = plan.num_workers * amount
        if need > total.get(res, 0) + 1e-9:
            problems.append(ConfigError(f"ray.worker_resources.{res}", f"the pair needs {need:g} '{res}' but the "
                                                                      f"cluster has {total.get(res, 0):g}"))
    if rs.use_gpu:
        problems += _gpu_problems(rs, plan, total)
    if not problems:
        return
    if os.environ.get(RESOURCE_CHECK_ENV, "strict").lower() != "warn":
        raise problems[0]
    for p in problems:
        print(f"warning: {p} now; waiting for the autoscaler to add nodes "
              f"({RESOURCE_CHECK_ENV}=strict refuses instead)", file=sys.stderr, flush=True)


def _gpu_problems(rs, plan: PairPlan, total: dict) -> list[ConfigError]:
    """The pair's GPUs against the cluster's: the whole pair (workers x ``ray.worker_gpus`` + the
    adapter actor's), one worker against the largest node (a worker never spans nodes), and under
    ``STRICT_PACK`` the worker group against the largest node."""
    per, field = rs.worker_gpus, "ray.gpus_per_worker" if rs.gpus_per_worker is not None else "ray.use_gpu"
    adapter = rs.adapter.num_gpus if plan.exchange_spec is not None else 0
    need = plan.num_workers * per + adapter
    have = total.get("GPU", 0)
    how = f"{plan.num_workers} workers x {per:g}" + (f" + {adapter:g} for the adapter" if adapter else "")
    if need > have + 1e-9:
        return [ConfigError(field, f"the pair needs {need:g} GPUs ({how}) but the cluster has {have:g}")]
    node_max = max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if per > node_max + 1e-9:
        return [ConfigError(field, f"one worker needs {per:g} GPUs but the largest node has {node_max:g}")]
    workers = plan.num_workers * per  # the worker group's placement group (the actor is apart)
    if rs.placement == "STRICT_PACK" and workers > node_max + 1e-9:
        return [ConfigError("ray.placement", f"STRICT_PACK puts the workers' {workers:g} GPUs on one node "
                                             f"but the largest node has {node_max:g}")]
    return []
