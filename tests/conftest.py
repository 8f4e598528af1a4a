"""Session fixtures: one real local Ray for the whole session (started lazily by the tests
that need it), quiet Train/Tune settings for a 2-core machine."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MERGENET_RAY_DASHBOARD", "0")

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

# 2 shared cores: one intra-op thread per process avoids oversubscription (Ray workers,
# servers and the test process all compute at once); results do not depend on it. This is the
# one place for the test process (test modules need not call helpers.limit_threads); the CLI and
# other subprocesses get the same through helpers.cli_env / helpers.run_cli.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


#: GPUs the session's local Ray declares (none exists: placement is what is tested)
DECLARED_GPUS = 2


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray (4 logical CPUs so small pairs pack on 2 cores), started once. It declares
    2 GPUs (:data:`DECLARED_GPUS`) so that GPU placement is tested on a CPU machine
    (tests/test_gpu_placement.py): Ray only counts them and sets ``CUDA_VISIBLE_DEVICES`` for the
    tasks that ask; nothing that asks for no GPU changes, and no test here runs CUDA code."""
    import ray

    # a test that ran `mergenet run` in this process may have left RAY_AUTH_MODE=token behind; the
    # GCS started here inherits the environment, the client keeps the mode it read on import
    os.environ.pop("RAY_AUTH_MODE", None)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=DECLARED_GPUS, object_store_memory=512 * 1024**2, include_dashboard=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
