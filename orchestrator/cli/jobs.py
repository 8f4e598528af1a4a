"""``mergenet submit``, ``status``, ``logs``, ``stop``: a grid as a Ray job on a cluster
(:mod:`orchestrator.cluster.submit`)."""
from __future__ import annotations

from .common import fail


def cmd_submit(args) -> int:
    from orchestrator.cluster.submit import submit

    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    if len(env) != len(args.env):
        return fail([f"--env: expected KEY=VALUE, got {[kv for kv in args.env if '=' not in kv]}"])
    submit(args.grid, args.address, args.set, args.working_dir, args.mlflow_uri, args.storage_path, args.python,
           env, deep=not args.no_deep_check, resume_dir=args.resume)
    return 0


def cmd_status(args) -> int:
    from orchestrator.cluster.submit import status

    state = status(args.job, args.address, wait=args.wait, timeout=args.timeout)
    return 1 if args.wait and state != "SUCCEEDED" else 0


def cmd_logs(args) -> int:
    from orchestrator.cluster.submit import logs

    state = logs(args.job, args.address, follow=args.follow)
    return 1 if args.follow and state in ("FAILED", "STOPPED") else 0


def cmd_stop(args) -> int:
    from orchestrator.cluster.submit import stop

    stop(args.job, args.address)
    return 0
