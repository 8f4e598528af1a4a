"""Reaching Ray: the environment our workers get, attaching to (or starting) a Ray."""
from __future__ import annotations

import os

import ray

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
