"""One pair on a real local Ray: equivalence with the engine, async mode, data-parallel
roles, fault tolerance with real kills, and bad input rejected before any worker starts."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import helpers
from helpers import assert_same_metrics, mergenet_options, read_metrics, tiny_pair, write_yaml
from orchestrator.config import parse_config
from mergenet_core.training.engine import Engine

RAY = {"cpus_per_worker": 0.5}


def mergenet_cfg(**over):
    cfg = tiny_pair("mergenet", mergenet_options(), recipe={"epochs": 2, "steps_per_epoch": 4}, ray=RAY)
    from mergenet_core.config import deep_merge
    return parse_config(deep_merge(cfg, over))


def test_sync_ray_pair_equals_single_process_engine(ray_local, tmp_path):
    from orchestrator.topology.split.driver import run_pair_on_ray

    cfg = mergenet_cfg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray workers with <=1 CPU run single-threaded: same reduction order
    try:
        Engine(cfg, tmp_path / "engine", progress=False).run()
    finally:
        torch.set_num_threads(threads)
    final = run_pair_on_ray(cfg, tmp_path / "ray")
    a, b = read_metrics(tmp_path / "engine"), read_metrics(tmp_path / "ray")
    assert [r["epoch"] for r in b] == [1, 2]
    assert b[-1]["adapter/transfers"] == 4 and "source/val_acc" in b[-1]
    assert all(r["target/transfer_writes"] == r["target/transfer_steps"] and r["target/transfer_age_steps"] == 0
               for r in b)  # sync: every transfer writes the output of its own step
    assert_same_metrics(a, b, tol=1e-5)
    assert final["target/final_test_acc"] == b[-1]["target/test_acc"]


def test_async_mode_and_data_parallel_target_complete(ray_local, tmp_path):
    from orchestrator.topology.split.driver import run_pair_on_ray

    cfg = mergenet_cfg(ray={"mode": "async", "staleness": 2, "target_workers": 2, "cpus_per_worker": 0.5})
    run_pair_on_ray(cfg, tmp_path / "async")
    hist = read_metrics(tmp_path / "async")
    assert [r["epoch"] for r in hist] == [1, 2]
    last = hist[-1]
    assert all(torch.isfinite(torch.tensor(float(v))) for v in last.values())
    assert last["adapter/transfers"] >= 1
    for r in hist:  # each transfer step wrote an output at most 2 transfers (t_cycle 1: 2 steps) old, or none
        assert r["target/transfer_steps"] == 4 and 1 <= r["target/transfer_writes"] <= 4
        assert 0 <= r["target/transfer_age_steps"] <= 2
    assert sorted(p.name for p in (tmp_path / "async" / "pids").glob("target*.pid")) == ["target0.pid", "target1.pid"]


def test_colocated_baseline_runs_on_ray(ray_local, tmp_path):
    from orchestrator.topology.split.driver import run_pair_on_ray

    cfg = parse_config(tiny_pair("dml", ray=RAY))
    final = run_pair_on_ray(cfg, tmp_path / "dml")
    assert "source/final_test_acc" in final and "target/final_test_acc" in final


@pytest.mark.parametrize("keep", ["last_and_best", "last"])
def test_keeps_only_the_last_and_the_best_validation_bundle(ray_local, tmp_path, keep):
    import json

    from mergenet_core.training.engine import load_bundle
    from orchestrator.topology.split.driver import run_pair_on_ray

    cfg = parse_config(tiny_pair("alone", source_model=None, recipe={"epochs": 4, "steps_per_epoch": 2}, ray=RAY))
    final = run_pair_on_ray(cfg, tmp_path / keep, keep_bundles=keep)
    kept = sorted(load_bundle(b)["epoch"] for b in (tmp_path / keep / "ray" / "pair").glob("checkpoint_*/pair.pt"))
    index = json.loads((tmp_path / keep / "bundles.json").read_text())
    assert index["last"]["epoch"] == 4
    if keep == "last":
        assert kept == [4] and "best_val" not in index
    else:  # the best-validation epoch as final.json names it (ties: the earliest)
        best = final["target/best_val_epoch"]
        assert kept == sorted({best, 4}) and index["best_val"]["epoch"] == best
        assert load_bundle(Path(index["best_val"]["path"]) / "pair.pt")["epoch"] == best
    assert "checkpoint/best_val" not in read_metrics(tmp_path / keep)[-1]  # bookkeeping is not a metric


def _run_in_thread(cfg, out):
    from orchestrator.topology.split.driver import run_pair_on_ray

    box = {}

    def go():
        try:
            box["final"] = run_pair_on_ray(cfg, out)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def _wait_for_epoch(out: Path, epoch: int, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len([l for l in m.read_text().splitlines() if l]) >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} never finished")


def _events(out: Path) -> list[dict]:
    import json

    f = out / "events.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l] if f.exists() else []


def _wait_for_start(out: Path, workers: set[str], timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if workers <= {e["worker"] for e in _events(out) if e["event"] == "started"}:
            return
        time.sleep(0.02)
    raise AssertionError(f"workers {workers} never started")


def _wait_for_events(out: Path, event: str, n: int, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len([e for e in _events(out) if e["event"] == event]) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{n} x {event} never happened")


KILL_RECIPE = {"epochs": 4, "steps_per_epoch": 12}
BIGGER = {"task": {"options": {"train_subset": 1000}}}  # 25 batches: the 12-step epoch cap applies


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same pair trained by the single-process engine (equal to an uninterrupted sync Ray
    run, test_sync_ray_pair_equals_single_process_engine)."""
    cfg = mergenet_cfg(recipe=KILL_RECIPE, source=BIGGER, target=BIGGER)
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Engine(cfg, out, progress=False).run()
    finally:
        torch.set_num_threads(threads)
    return read_metrics(out)


def _kill_and_recover(tmp_path, victim: str, after_epoch: int, uninterrupted: list[dict]) -> dict:
    """Train the pair on Ray, SIGKILL ``victim`` (``source0``, ``target0`` or ``adapter``) once
    ``after_epoch`` epochs are checkpointed (0: while the first epoch trains, before any
    checkpoint), and check the recovery: no stall, every epoch once, metrics equal to the
    uninterrupted run. Returns the measured figures."""
    cfg = mergenet_cfg(recipe=KILL_RECIPE, source=BIGGER, target=BIGGER)
    out = tmp_path / victim
    t0 = time.time()
    t, box = _run_in_thread(cfg, out)
    if after_epoch == 0:
        _wait_for_start(out, {"source0", "target0"})
        time.sleep(0.2)  # inside epoch 1: transfers under way, nothing checkpointed
    else:  # epoch `after_epoch` is reported (its checkpoint registered), the next one trains
        _wait_for_events(out, "reported", after_epoch)
        time.sleep(0.5)  # > the controller's poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2): registered
    pid_file = out / "pids" / f"{victim}.pid"
    old_worker = (out / "pids" / "target0.pid").read_text()
    killed_at = time.time()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    reported_before = [e for e in _events(out) if e["event"] == "reported" and e["t"] < killed_at]
    t.join(timeout=300)
    assert not t.is_alive(), "pair did not finish after the kill"
    assert "error" not in box, box.get("error")
    wall = time.time() - t0
    hist = read_metrics(out)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert [r["step"] for r in hist] == [12, 24, 36, 48]
    if victim != "adapter":  # the worker group really restarted (a new process) and resumed
        assert (out / "pids" / "target0.pid").read_text() != old_worker
    restarts = [e for e in _events(out) if e["event"] == "started" and e["t"] > killed_at]
    assert restarts, "no worker restarted"
    resumed_epoch = min(e["epoch"] for e in restarts)
    # from the last *registered* checkpoint (0: from scratch). Ray Train registers a reported
    # checkpoint when its controller next polls the workers (every health-check interval), so a
    # kill inside that window restarts from the one before: at most one epoch of work is redone
    n = len(reported_before)
    assert max(0, n - 1) <= resumed_epoch <= n + 1, (resumed_epoch, n)
    if after_epoch == 0:
        assert not reported_before and resumed_epoch == 0
    # the adapters restarted from the same checkpoint: every number equals the uninterrupted run
    assert all(r["adapter/transfers"] == 12 for r in hist)
    assert_same_metrics(uninterrupted, hist, tol=1e-5)
    diff = max(abs(a[k] - b[k]) for a, b in zip(uninterrupted, hist) for k in
               ("target/test_acc", "source/test_acc", "target/val_acc"))
    first_epoch_after = [e for e in _events(out) if e["event"] == "reported" and e["t"] > killed_at]
    figures = {"victim": victim, "after_epoch": after_epoch, "reported_before_kill": n, "resumed_from_epoch": resumed_epoch,
               "restart_s": round(min(e["t"] for e in restarts) - killed_at, 2),
               "next_checkpoint_s": round(first_epoch_after[0]["t"] - killed_at, 2) if first_epoch_after else None,
               "wall_s": round(wall, 1), "max_acc_diff": diff}
    print("RECOVERY", figures)
    return figures


@pytest.mark.parametrize("victim, after_epoch", [
    ("source0", 0),   # before the first checkpoint: the deadlock case
    ("target0", 1),
    ("adapter", 1),
], ids=["source0-before-first-checkpoint", "target0-after-epoch-1", "adapter-after-epoch-1"])
def test_pair_survives_a_real_kill_and_matches_the_uninterrupted_run(ray_local, tmp_path, uninterrupted,
                                                                     victim, after_epoch):
    _kill_and_recover(tmp_path, victim, after_epoch, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("victim, after_epoch", [
    ("target0", 0), ("adapter", 0), ("source0", 1), ("source0", 2), ("target0", 3), ("adapter", 2),
])
def test_every_kill_point_recovers(ray_local, tmp_path, uninterrupted, victim, after_epoch):
    _kill_and_recover(tmp_path, victim, after_epoch, uninterrupted)


#: fast hang detection for the test (the defaults: floor 20 s, beat 1 s; docs/RELIABILITY.md)
FAST_HANG = {"floor_s": 5.0, "interval_s": 0.5}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _stop_and_recover(tmp_path, victim: str, after_epoch: int, uninterrupted: list[dict], hang: dict) -> dict:
    """Train the pair on Ray, SIGSTOP ``victim`` (``source0``, ``target0`` or ``adapter``) in the
    middle of epoch ``after_epoch + 1`` and check: the hang is found, the stopped process is
    killed by the restart, the pair finishes within 60 s of the stop and every metric equals the
    uninterrupted run. Returns the measured figures."""
    cfg = mergenet_cfg(recipe=KILL_RECIPE, source=BIGGER, target=BIGGER, ray={"hang": hang})
    out = tmp_path / victim
    t0 = time.time()
    t, box = _run_in_thread(cfg, out)
    _wait_for_events(out, "reported", after_epoch)
    time.sleep(0.5)  # > the controller's poll: epoch `after_epoch` registered, the next one training
    pid = int((out / "pids" / f"{victim}.pid").read_text())
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    try:
        t.join(timeout=240)
        assert not t.is_alive(), "pair did not finish after the stop"
        assert "error" not in box, box.get("error")
        done_at = time.time()
        deadline = time.time() + 15  # ray.kill ends a stopped process after Ray's grace period
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the stopped process outlived the restart"
    finally:
        if _alive(pid):  # never leave a stopped process behind
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)
    events = _events(out)
    hangs = [e for e in events if e["event"] == "hang" and e["t"] > stopped_at]
    assert hangs, "no worker reported the hang"
    restarts = [e for e in events if e["event"] == "started" and e["t"] > stopped_at]
    assert restarts, "no worker restarted"
    restart_s = min(e["t"] for e in restarts) - stopped_at
    assert restart_s < 60, restart_s
    hist = read_metrics(out)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    assert all(r["adapter/transfers"] == 12 for r in hist)
    assert_same_metrics(uninterrupted, hist, tol=1e-5)
    first_after = [e["t"] for e in events if e["event"] == "reported" and e["t"] > stopped_at]
    figures = {"victim": victim, "after_epoch": after_epoch, "hang": hang,
               "detected_s": round(min(e["t"] for e in hangs) - stopped_at, 2),
               "detected_by": sorted({e["worker"] for e in hangs}), "reason": hangs[0]["reason"],
               "restart_s": round(restart_s, 2), "resumed_from_epoch": min(e["epoch"] for e in restarts),
               "next_checkpoint_s": round(first_after[0] - stopped_at, 2) if first_after else None,
               "finished_s": round(done_at - stopped_at, 1), "wall_s": round(done_at - t0, 1)}
    print("HANG RECOVERY", figures)
    return figures


def test_pair_recovers_from_a_stopped_worker_and_matches_the_uninterrupted_run(ray_local, tmp_path,
                                                                              uninterrupted):
    """SIGSTOP of the target's worker mid-epoch: the source, which never waits for the target
    inside an epoch, blocks in the epoch's gather; it finds the target's heartbeat missing and
    exits, Ray Train restarts the group (killing the stopped worker) from the last checkpoint."""
    _stop_and_recover(tmp_path, "target0", 1, uninterrupted, FAST_HANG)


@pytest.mark.slow
@pytest.mark.parametrize("victim, hang", [
    ("source0", FAST_HANG),  # the target waits in its adapter get: heartbeat and call deadline
    ("adapter", FAST_HANG),  # the actor is killed and restarted by the worker that finds it stuck
    ("source0", {}),         # the default deadline (floor 20 s)
], ids=["source0", "adapter", "source0-default-deadline"])
def test_every_stopped_process_recovers(ray_local, tmp_path, uninterrupted, victim, hang):
    _stop_and_recover(tmp_path, victim, 1, uninterrupted, hang)


def _cli(*args, cwd):
    return helpers.run_cli(*args, cwd=cwd, env={"MERGENET_RAY_DASHBOARD": "0"}, timeout=240)


@pytest.mark.parametrize("change, field", [
    ({"method": {"options": {"layer_pairs": [{"source": "nope.weight", "target": "classifier.weight"}]}}},
     "method.options.layer_pairs.0.source"),
    ({"method": {"options": {"layer_pairs": [{"source": "classifier.weight", "target": "classifier.weight",
                                              "rank": 999}]}}},
     "method.options.layer_pairs.0.source"),
    ({"ray": {"cpus_per_worker": 512}}, "ray.cpus_per_worker"),
])
def test_bad_pair_rejected_before_any_worker(tmp_path, change, field):
    from mergenet_core.config import deep_merge

    cfg = deep_merge(tiny_pair("mergenet", mergenet_options(), ray=RAY), change)
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    r = _cli("train", str(path), "--ray", "--out", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and field in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "pids").exists()  # no worker ever started


def test_ray_pair_with_trained_frozen_source_and_svd_alignment_equals_engine(ray_local, tmp_path):
    """``source.init_from`` loads in the source worker; the svd alignment state and the
    per-link diagnostics behave the same in the split topology as in the engine."""
    from orchestrator.topology.split.driver import run_pair_on_ray

    trained = tmp_path / "trained"
    Engine(parse_config(tiny_pair("alone", source_model=None, recipe={"steps_per_epoch": 3})), trained,
           progress=False).run()
    opts = mergenet_options(source="features.1.conv.weight", target="features.1.conv.weight",
                            freeze_source=True)
    opts["layer_pairs"][0]["mode"] = "svd"
    cfg = mergenet_cfg(method={"options": opts}, source={"init_from": str(trained)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Engine(cfg, tmp_path / "engine", progress=False).run()
    finally:
        torch.set_num_threads(threads)
    run_pair_on_ray(cfg, tmp_path / "ray")
    a, b = read_metrics(tmp_path / "engine"), read_metrics(tmp_path / "ray")
    # a frozen source's factors do not move: cosine 1 up to float32 rounding (another process and
    # thread count may round the SVD differently; observed 0.99999976)
    assert b[-1]["transfer/0/provider_factor_cos"] == pytest.approx(1.0, abs=1e-5)
    assert "transfer/0/write_change" in b[-1]
    assert "source/val_acc" not in b[-1]  # frozen: not trained, not evaluated
    assert_same_metrics(a, b, tol=1e-5)
