"""``mergenet submit|status|logs|stop``: run a grid on a Ray cluster through Ray Jobs.

``mergenet submit GRID.yaml --address http://HEAD:8265`` validates the grid here first (a bad
grid exits with code 2 before the cluster is contacted), then submits a Ray job whose
entrypoint is ``python -m orchestrator.cli run GRID.yaml`` on the head node. The working
directory (this checkout, minus outputs and VCS data) is shipped with the job, so the code
the cluster runs is the code you are looking at; Ray makes it the working directory of the
driver and of every task and actor of the job.

Where the job writes:

* MLflow: ``--mlflow-uri`` (sent as ``MLFLOW_TRACKING_URI`` in the job's runtime env), else the
  ``MLFLOW_TRACKING_URI`` the cluster's Ray was started with (``cluster.yaml`` exports the
  head's MLflow server), else ``sqlite:///mlflow.db`` inside the job's temporary working
  directory (lost with it: always give one of the former on a cluster).
* Tune/Train storage: the grid's own ``storage_path``, else ``--storage-path``, else the
  ``MERGENET_STORAGE_PATH`` the cluster's Ray was started with, else ``runs/grids`` inside
  the job's temporary working directory.

Token authentication (Ray 2.60): a cluster started with ``RAY_AUTH_MODE=token`` answers only
requests that carry its token. Unless ``RAY_AUTH_MODE=disabled`` is set here, every request
sends ``Authorization: Bearer <token>`` with the first token found in ``RAY_AUTH_TOKEN``, the
file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` — the places Ray itself reads,
in Ray's order. A cluster without token auth ignores the header.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mergenet_core.errors import MergenetError, short

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the local end of `ray dashboard cluster.yaml` / an SSH tunnel

#: never shipped with a job (on top of what .gitignore files exclude; Ray honours those too)
EXCLUDES = [".git", "runs/", "mlruns/", "mlflow.db", "mlflow.db-journal", "mlartifacts/", "__pycache__/",
            "*.egg-info/", ".pytest_cache/", ".benchmarks/", ".venv/", "*.pyc"]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# --------------------------------------------------------------------------- client


def resolve_address(address: str | None) -> str:
    """``--address``, else ``RAY_API_SERVER_ADDRESS``, else an ``http(s)://`` ``RAY_ADDRESS``,
    else :data:`DEFAULT_ADDRESS`. A bare ``HOST:PORT`` gets ``http://``."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    address = address or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def find_token() -> tuple[str | None, str | None]:
    """(token, where it came from), looked up where and in the order Ray looks."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, None
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        try:
            tok = p.read_text().strip()
        except OSError as e:
            raise MergenetError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({e.strerror})") from None
        if not tok:
            raise MergenetError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return tok, str(p)
    p = Path.home() / ".ray" / "auth_token"
    if p.is_file():
        tok = p.read_text().strip()
        if tok:
            return tok, str(p)
    return None, None


def _auth_help(address: str, source: str | None) -> str:
    sent = f"the token from {source} was refused" if source else "no token was sent"
    return (f"the Ray cluster at {address} requires token authentication and {sent}. Copy the cluster's "
            "token (e.g. `ray exec cluster.yaml 'cat ~/.ray/auth_token'`) into RAY_AUTH_TOKEN_PATH=<file>, "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token (see docs/CLUSTER.md, 'Token authentication')")


def client(address: str | None = None):
    """A connected :class:`ray.job_submission.JobSubmissionClient` (version checked)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token, source = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise MergenetError(_auth_help(address, source)) from None
    except (ConnectionError, OSError) as e:
        raise MergenetError(f"cannot reach the Ray job server at {address} ({e}). Is the cluster up and the "
                            "dashboard port reachable (`ray dashboard cluster.yaml` opens a tunnel to "
                            f"{DEFAULT_ADDRESS})?") from None
    except RuntimeError as e:
        raise MergenetError(f"Ray job server at {address}: {e}") from None


def _call(fn, *args, what: str = "request", address: str = "", **kwargs):
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError:
        raise MergenetError(_auth_help(address, find_token()[1])) from None
    except RuntimeError as e:
        text = str(e)
        if "does not exist" in text or "404" in text:
            raise MergenetError(f"{what}: no such job at {address}") from None
        raise MergenetError(f"{what}: {text}") from None
    except (ConnectionError, OSError) as e:
        raise MergenetError(f"{what}: lost the Ray job server at {address} ({e})") from None


# --------------------------------------------------------------------------- submit


def build_job(grid_path: str | Path, overrides: list[str] | None = None, working_dir: str | Path = ".",
              mlflow_uri: str | None = None, storage_path: str | None = None, python: str = "python",
              env: dict[str, str] | None = None, deep: bool = True) -> dict[str, Any]:
    """Validate the grid here and return the job's ``entrypoint``, ``runtime_env``,
    ``metadata`` and ``submission_id`` (nothing is contacted)."""
    from orchestrator.grid.load import load_grid

    grid = load_grid(grid_path, overrides, deep=deep)  # ConfigErrors -> exit 2 before any network use
    wd = Path(working_dir).resolve()
    gp = Path(grid_path).resolve()
    try:
        rel = gp.relative_to(wd).as_posix()
    except ValueError:
        raise MergenetError(f"{grid_path}: the grid file must be inside the shipped working directory {wd} "
                            "(run `mergenet submit` from the repository root, or pass --working-dir)") from None
    if any(gp.is_relative_to(wd / ex.rstrip("/")) for ex in EXCLUDES if ex.endswith("/") and "*" not in ex):
        raise MergenetError(f"{grid_path}: lies in a folder that is not shipped with the job ({EXCLUDES})")

    for plugin in [*grid.plugins, *grid.base.get("plugins", [])]:  # shipped with the job, or refused here
        if plugin.endswith(".py") and not Path(plugin).resolve().is_relative_to(wd):
            raise MergenetError(f"plugins: {plugin} lies outside the shipped working directory {wd} "
                                "(move it beside the grid, or pass --working-dir)")
    entry, storage_note = _entrypoint(grid, rel, overrides, storage_path, python)
    env_vars = _job_env(mlflow_uri, storage_path, env)
    check_job_env(env_vars)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return {
        "grid": grid,
        "entrypoint": entry,
        "submission_id": f"mergenet-{grid.grid}-{stamp}-{os.urandom(2).hex()}",
        "runtime_env": {"working_dir": str(wd), "excludes": list(EXCLUDES), "env_vars": env_vars},
        "metadata": {"mergenet.grid": grid.grid, "mergenet.grid_file": rel, "mergenet.trials": str(grid.trial_count()),
                     "mergenet.git_sha": _git_sha(wd)},
        "mlflow": mlflow_uri or "the cluster's MLFLOW_TRACKING_URI",
        "storage": storage_note,
    }


def _entrypoint(grid, rel: str, overrides: list[str] | None, storage_path: str | None, python: str):
    """The job's command line (``mergenet run`` of the shipped grid file) and where its storage is."""
    args = [python, "-m", "orchestrator.cli", "run", rel]
    for o in overrides or []:
        args += ["--set", o]
    entry = " ".join(shlex.quote(a) for a in args)
    storage_note = None
    if grid.storage_path:
        storage_note = f"grid storage_path {grid.storage_path}"
        if "://" not in grid.storage_path and not grid.storage_path.startswith(("/", "~")):
            storage_note += " (relative: inside the job's temporary working directory!)"
    elif storage_path:
        entry += " " + " ".join(shlex.quote(a) for a in ["--set", f"storage_path={storage_path}"])
        storage_note = storage_path
    else:
        # resolved on the head by its shell: the cluster's MERGENET_STORAGE_PATH, if Ray was started with one
        entry += ' ${MERGENET_STORAGE_PATH:+--set "storage_path=$MERGENET_STORAGE_PATH"}'
        storage_note = "the cluster's MERGENET_STORAGE_PATH (else runs/grids in the job's working directory)"
    return entry, storage_note


def _job_env(mlflow_uri: str | None, storage_path: str | None, env: dict[str, str] | None) -> dict[str, str]:
    env_vars = {
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        # `mergenet run` calls ray.init(runtime_env={env_vars: MLFLOW_*, ...}) inside the job: let it
        # extend the job's runtime env (same keys, same values) instead of failing on the overlap
        "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
    }
    if mlflow_uri:
        env_vars["MLFLOW_TRACKING_URI"] = mlflow_uri
    if storage_path:
        env_vars["MERGENET_STORAGE_PATH"] = storage_path
    env_vars.update(env or {})
    return env_vars


def check_job_env(env_vars: dict[str, str]) -> None:
    """A job's runtime env is stored in the GCS and shown by the dashboard and ``ray job``: no
    secret-looking variable and no URI with ``user:password@`` goes into it."""
    from orchestrator.cluster.secrets import check_no_credentials, is_secret_name

    for k, v in env_vars.items():
        if is_secret_name(k):
            raise MergenetError(f"--env {short(k, 40)}: looks like a secret; a job's runtime env is visible in the "
                                "dashboard and job logs: provision it on the nodes (a file of mode 600) instead")
        check_no_credentials(k, v)


def _git_sha(wd: Path) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(wd), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_resume_job(resume_dir: str, working_dir: str | Path = ".", mlflow_uri: str | None = None,
                     python: str = "python", env: dict[str, str] | None = None) -> dict[str, Any]:
    """A job that resumes an interrupted grid from its storage folder *as the cluster sees it*
    (``<storage_path>/<grid>``): finished trials are kept, unfinished ones restart from their
    last checkpoint and re-attach their MLflow runs (``mergenet run --resume``)."""
    wd = Path(working_dir).resolve()
    where = urlsplit(str(resume_dir)).path if "://" in str(resume_dir) else str(resume_dir)  # no ?query
    name = Path(where.rstrip("/")).name or "grid"
    env_vars = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    if mlflow_uri:
        env_vars["MLFLOW_TRACKING_URI"] = mlflow_uri
    env_vars.update(env or {})
    check_job_env(env_vars)
    return {
        "grid": None,
        "entrypoint": " ".join(shlex.quote(a) for a in [python, "-m", "orchestrator.cli", "run", "--resume",
                                                         str(resume_dir)]),
        "submission_id": f"mergenet-{name}-resume-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}",
        "runtime_env": {"working_dir": str(wd), "excludes": list(EXCLUDES), "env_vars": env_vars},
        "metadata": {"mergenet.grid": name, "mergenet.resume": str(resume_dir), "mergenet.git_sha": _git_sha(wd)},
        "mlflow": mlflow_uri or "the cluster's MLFLOW_TRACKING_URI",
        "storage": str(resume_dir),
    }


def submit(grid_path: str | Path | None, address: str | None = None, overrides: list[str] | None = None,
           working_dir: str | Path = ".", mlflow_uri: str | None = None, storage_path: str | None = None,
           python: str = "python", env: dict[str, str] | None = None, deep: bool = True, out=None,
           resume_dir: str | None = None) -> str:
    """Validate, then submit the grid (or, with ``resume_dir``, the resumption of an interrupted
    grid) as a Ray job; prints where to watch; returns the job id."""
    out = out or sys.stdout
    if resume_dir:
        if grid_path or overrides or storage_path:
            raise MergenetError("submit --resume DIR: give no GRID, --set or --storage-path (the folder has the grid)")
        job = build_resume_job(resume_dir, working_dir, mlflow_uri, python, env)
    elif grid_path:
        job = build_job(grid_path, overrides, working_dir, mlflow_uri, storage_path, python, env, deep)
    else:
        raise MergenetError("submit: give a GRID.yaml, or --resume DIR")
    addr = resolve_address(address)
    c = client(addr)
    job_id = _call(c.submit_job, what="submit", address=addr, entrypoint=job["entrypoint"],
                   runtime_env=job["runtime_env"], metadata=job["metadata"], submission_id=job["submission_id"])
    g = job["grid"]
    what = f"grid {g.grid} ({g.trial_count()} trials)" if g else f"resumption of {resume_dir}"
    print(f"submitted job {job_id}: {what} to {addr}", file=out)
    print(f"  entrypoint: {job['entrypoint']}", file=out)
    print(f"  MLflow:     {job['mlflow']}", file=out)
    print(f"  storage:    {job['storage']}", file=out)
    print(f"  dashboard:  {addr}/#/jobs/{job_id}", file=out)
    print(f"  follow:     mergenet logs {job_id} --follow" + _addr_flag(address), file=out)
    print(f"  status:     mergenet status {job_id}" + _addr_flag(address), file=out)
    print(f"  stop:       mergenet stop {job_id}" + _addr_flag(address), file=out)
    return job_id


def _addr_flag(address: str | None) -> str:
    return f" --address {address}" if address else ""


# --------------------------------------------------------------------------- status / logs / stop


def status(job_id: str | None, address: str | None = None, wait: bool = False, timeout: float | None = None,
           out=None) -> str | None:
    """Print one job's state (optionally waiting for a terminal state), or list mergenet jobs."""
    out = out or sys.stdout
    addr = resolve_address(address)
    c = client(addr)
    if job_id is None:
        jobs = _call(c.list_jobs, what="status", address=addr)
        rows = sorted(jobs, key=lambda j: j.start_time or 0)
        print(f"{'job':<48} {'status':<10} {'grid':<24} started", file=out)
        for j in rows:
            md = j.metadata or {}
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
            print(f"{(j.submission_id or j.job_id or '-'):<48} {str(j.status.value):<10} "
                  f"{md.get('mergenet.grid', '-'):<24} {started}", file=out)
        return None
    deadline = time.time() + timeout if timeout else None
    while True:
        info = _call(c.get_job_info, job_id, what="status", address=addr)
        state = info.status.value
        if not wait or state in TERMINAL:
            break
        if deadline and time.time() > deadline:
            break
        time.sleep(2)
    md = info.metadata or {}
    print(f"{job_id}: {state}" + (f"  ({info.message})" if info.message else ""), file=out)
    if md.get("mergenet.grid"):
        print(f"  grid {md['mergenet.grid']} ({md.get('mergenet.grid_file', '?')}, "
              f"{md.get('mergenet.trials', '?')} trials, git {md.get('mergenet.git_sha', '?')})", file=out)
    if info.start_time:
        end = info.end_time or time.time() * 1000
        print(f"  running time {(end - info.start_time) / 1000:.0f} s", file=out)
    return state


def logs(job_id: str, address: str | None = None, follow: bool = False, out=None) -> str:
    """Print the job's driver log (all of it, or following it until the job ends); returns the
    job's state at the end."""
    out = out or sys.stdout
    addr = resolve_address(address)
    c = client(addr)
    if not follow:
        text = _call(c.get_job_logs, job_id, what="logs", address=addr)
        out.write(text)
        out.flush()
        return _call(c.get_job_status, job_id, what="logs", address=addr).value

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    _call(c.get_job_status, job_id, what="logs", address=addr)  # a clear error for an unknown job
    try:
        _call(asyncio.run, tail(), what="logs", address=addr)
    except MergenetError:
        # the log stream may end with the connection rather than a close frame: the state decides
        pass
    return _call(c.get_job_status, job_id, what="logs", address=addr).value


def stop(job_id: str, address: str | None = None, wait: bool = True, timeout: float = 60.0, out=None) -> str:
    """Ask the job to stop (SIGTERM to the driver, then SIGKILL); waits for STOPPED by default."""
    out = out or sys.stdout
    addr = resolve_address(address)
    c = client(addr)
    asked = _call(c.stop_job, job_id, what="stop", address=addr)
    state = _call(c.get_job_status, job_id, what="stop", address=addr).value
    deadline = time.time() + timeout
    while wait and state not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        state = _call(c.get_job_status, job_id, what="stop", address=addr).value
    print(f"{job_id}: {'stop requested' if asked else 'was not running'}; now {state}", file=out)
    return state
