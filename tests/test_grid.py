"""Grids on a real local Ray, tracked in a real `mlflow server` on 127.0.0.1 (sqlite backend),
checked through MLflow's REST API; interrupted grids resume without duplicate runs; malformed
grids are rejected with exit 2 before Ray starts."""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import CLI, RAY_GRID, ROOT, cli_env, fmnist_task, free_port, mergenet_arm, run_cli, tiny_grid, write_yaml

TASK = fmnist_task()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend), stopped by PID."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "1"],
        cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def api(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url + "/api/2.0/mlflow/" + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def search_runs(url: str, exp_id: str, flt: str = "") -> list[dict]:
    return api(url, "runs/search", {"experiment_ids": [exp_id], "filter": flt, "max_results": 1000}).get("runs", [])


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


MERGENET = mergenet_arm()


def test_grid_tracked_in_mlflow_server(mlflow_server, tmp_path):
    # two arms of one method: `mergenet` and its variant `mergenet_t2` (the arm vs arm comparison)
    # the split topology (Ray Train role workers + adapter actor), explicitly: the inline one has
    # its own test (tests/test_inline.py)
    grid = tiny_grid("g-server", **(RAY_GRID | {"methods": {
        "alone": {}, "mergenet": MERGENET, "mergenet_t2": {"method": "mergenet", **MERGENET, "t_cycle": 2}}}),
        ray={"topology": "split"})
    path = write_yaml(tmp_path / "grid.yaml", grid)
    r = run_cli("run", path, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server}, timeout=600, check=0)
    assert "RUNNING" in r.stdout and "FINISHED" in r.stdout  # one line per state change
    assert "| cnn-cnn" in r.stdout and "Paired differences to `alone`" in r.stdout  # the report tables

    exp = api(mlflow_server, "experiments/get-by-name?experiment_name=g-server")["experiment"]
    exp_tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table
    runs = search_runs(mlflow_server, exp["experiment_id"])
    parents = [x for x in runs if tags(x).get("mergenet.kind") == "submission"]
    children = [x for x in runs if tags(x).get("mergenet.trial") == "1"]
    assert len(parents) == 1 and len(children) == 6
    parent_id = parents[0]["info"]["run_id"]
    assert {x["info"]["status"] for x in runs} == {"FINISHED"}
    combos = set()
    for ch in children:
        t = tags(ch)
        arm, seed = t["mergenet.arm"], t["mergenet.seed"]
        assert t["mlflow.parentRunId"] == parent_id
        assert t["mergenet.git_sha"] and t["mergenet.pair"] == "cnn-cnn"
        assert t["mergenet.method"] == ("alone" if arm == "alone" else "mergenet")
        assert ch["info"]["run_name"] == f"{arm} s{seed} · cnn-cnn"  # arm and seed first
        combos.add((arm, seed))
        params = {p["key"]: p["value"] for p in ch["data"]["params"]}
        assert params["method.name"] == t["mergenet.method"] and params["seed"] == seed
        assert params["arm"] == arm and params["pair"] == "cnn-cnn"  # what varies, as short params
        if arm != "alone":
            assert params["method.options.t_cycle"] == ("2" if arm == "mergenet_t2" else "1")
        assert all(len(v) <= 500 for v in params.values())
        run_id = ch["info"]["run_id"]
        metrics = {m["key"]: m["value"] for m in ch["data"]["metrics"]}
        assert not {"epoch", "epochs", "step", "steps"} & set(metrics)  # counters are steps, not metrics
        assert not any(k.startswith("checkpoint/") for k in metrics)
        folder = tmp_path / "runs" / "grids" / "g-server" / "trials" / t["mergenet.trial_id"]
        final = json.loads((folder / "pair" / "final.json").read_text())
        for k in ("target/final_test_acc", "target/test_acc_at_best_val"):  # the trial's summary, on every run
            assert 0 <= metrics[k] <= 1 and metrics[k] == pytest.approx(final[k]), (k, metrics[k], final[k])
        if arm == "alone":
            assert "gain_vs_alone/final_test_acc" not in metrics
        else:  # the report's per-seed gain over alone, on the child run
            alone = next(x for x in children if tags(x)["mergenet.arm"] == "alone" and tags(x)["mergenet.seed"] == seed)
            am = {m["key"]: m["value"] for m in alone["data"]["metrics"]}
            for k in ("final_test_acc", "test_acc_at_best_val"):
                assert metrics[f"gain_vs_alone/{k}"] == pytest.approx(100 * (metrics[f"target/{k}"] - am[f"target/{k}"]))
        hist = api(mlflow_server, f"metrics/get-history?run_id={run_id}&metric_key=target/val_acc")["metrics"]
        assert sorted(m["step"] for m in hist) == [1, 2]
        if arm == "mergenet":
            for key in ("source/val_acc", "adapter/transfers", "adapter/grad_norm", "adapter/generate_ms"):
                h = api(mlflow_server, f"metrics/get-history?run_id={run_id}&metric_key={key}")["metrics"]
                assert len(h) == 2, key
            assert t["mergenet.node.source0"] and t["mergenet.node.target0"]
        files = {f["path"] for f in api(mlflow_server, f"artifacts/list?run_id={run_id}").get("files", [])}
        assert {"config.json", "final.json", "metrics.jsonl", "learning_curve.png"} <= files
        # small outputs: the last and the best-validation bundle only
        assert 1 <= len(list((folder / "train").glob("checkpoint_*/pair.pt"))) <= 2
        assert json.loads((folder / "pair" / "bundles.json").read_text())["last"]["epoch"] == 2
    assert combos == {(a, s) for a in ("alone", "mergenet", "mergenet_t2") for s in ("0", "1")}
    rep = {f["path"] for f in api(mlflow_server, f"artifacts/list?run_id={parent_id}&path=report").get("files", [])}
    assert {"report/report.md", "report/trials.parquet", "report/paired.parquet", "report/history.parquet",
            "report/forest.png", "report/curves_cnn-cnn.png"} <= rep
    pm = {m["key"]: m["value"] for m in
          api(mlflow_server, f"runs/get?run_id={parent_id}")["run"]["data"].get("metrics", [])}
    assert pm["paired/mergenet_vs_alone/cnn-cnn/final/n"] == 2
    for kind, k in (("final", "final_test_acc"), ("best_val", "test_acc_at_best_val")):  # the mean per-seed gain
        gains = [m["value"] for x in children if tags(x)["mergenet.arm"] == "mergenet"
                 for m in x["data"]["metrics"] if m["key"] == f"gain_vs_alone/{k}"]
        assert len(gains) == 2 and pm[f"paired/mergenet_vs_alone/cnn-cnn/{kind}/mean_diff"] == pytest.approx(
            sum(gains) / 2, abs=1e-3), (kind, gains)  # points, rounded to 0.001
    note = tags(api(mlflow_server, f"runs/get?run_id={parent_id}")["run"])["mlflow.note.content"]
    assert "[report.md](#/experiments/" in note and "forest.png" in note and "curves_cnn-cnn.png" in note

    # the saved view the printed link opens: an experiment tag of the shape MLflow's UI restores
    from orchestrator.tracking.view import SEARCH_FACETS, UI_FIELDS

    envelope = json.loads(exp_tags["mlflow.sharedViewState.mergenet-g-server"])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert set(state) <= set(SEARCH_FACETS) | set(UI_FIELDS)
    assert state["searchFilter"] == f"tags.`mergenet.trial` = '1' and tags.`mlflow.parentRunId` = '{parent_id}'"
    assert state["groupBy"] == {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "arm"}]}
    assert state["runsHiddenMode"] == "SHOW_ALL" and state["orderByKey"] == "metrics.`target/test_acc_at_best_val`"
    mergenet_run = next(x for x in children if tags(x)["mergenet.arm"] == "mergenet")
    have = ({f"params.`{p['key']}`" for p in mergenet_run["data"]["params"]}
            | {f"metrics.`{m['key']}`" for m in mergenet_run["data"]["metrics"]})
    assert set(state["selectedColumns"]) <= have, set(state["selectedColumns"]) - have  # every column has values
    hist = api(mlflow_server, f"metrics/get-history?run_id={mergenet_run['info']['run_id']}"
                              "&metric_key=target/test_acc_at_best_val")["metrics"]
    assert [m["step"] for m in hist] == [0]  # a summary: one point at step 0 (a bar in the charts)

    # arm vs arm: mergenet against its variant, into a RESULTS.md section
    md = tmp_path / "RESULTS.md"
    r = run_cli("report", "g-server", "--control", "mergenet_t2", "--results-md", md, "--section", "Tiny study",
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server}, timeout=300, check=0)
    assert "Paired differences to `mergenet_t2`" in r.stdout
    assert "<!-- tiny-study:start -->\n## Tiny study" in md.read_text()
    pm = {m["key"]: m["value"] for m in
          api(mlflow_server, f"runs/get?run_id={parent_id}")["run"]["data"].get("metrics", [])}
    assert pm["paired/mergenet_vs_mergenet_t2/cnn-cnn/final/n"] == 2


def test_interrupted_grid_resumes_without_duplicate_runs(mlflow_server, tmp_path):
    grid = tiny_grid("g-resume", **(RAY_GRID | {"methods": {"alone": {}}, "seeds": (0, 1, 2), "max_concurrent_trials": 1,
                                                "epochs": 3, "steps_per_epoch": 4}))
    path = write_yaml(tmp_path / "grid.yaml", grid)
    proc = subprocess.Popen([*CLI, "run", str(path), "--no-report"], cwd=tmp_path,
                            env=cli_env(MLFLOW_TRACKING_URI=mlflow_server), stdout=open(tmp_path / "first.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    exp_id = None
    while time.time() < deadline:  # interrupt once the first trial has finished
        try:
            exp_id = exp_id or api(mlflow_server, "experiments/get-by-name?experiment_name=g-resume")["experiment"][
                "experiment_id"]
            done = [x for x in search_runs(mlflow_server, exp_id, "tags.`mergenet.trial` = '1'")
                    if x["info"]["status"] == "FINISHED"]
            if done:
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("no trial finished: " + (tmp_path / "first.log").read_text()[-3000:])
    os.killpg(proc.pid, signal.SIGKILL)  # everything the first submission started, by its process group
    proc.wait(timeout=30)
    time.sleep(2)
    before = search_runs(mlflow_server, exp_id, "tags.`mergenet.trial` = '1'")
    assert 1 <= len(before) < 4

    r = run_cli("run", "--resume", tmp_path / "runs" / "grids" / "g-resume", "--no-report", cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": mlflow_server}, timeout=600, check=0)
    children = search_runs(mlflow_server, exp_id, "tags.`mergenet.trial` = '1'")
    seeds = sorted(tags(x)["mergenet.seed"] for x in children)
    assert seeds == ["0", "1", "2"], seeds  # every trial exactly once: no duplicate runs
    finished = [l for l in (r.stdout + r.stderr).splitlines() if " FINISHED " in l]
    if finished:  # the resumed count includes the trials it found done
        assert finished[-1].endswith("(3/3)"), finished
    assert {x["info"]["status"] for x in children} == {"FINISHED"}
    parents = [x for x in search_runs(mlflow_server, exp_id) if tags(x).get("mergenet.kind") == "submission"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    for ch in children:
        hist = api(mlflow_server, f"metrics/get-history?run_id={ch['info']['run_id']}&metric_key=target/val_acc")
        assert sorted(m["step"] for m in hist["metrics"]) == [1, 2, 3]


@pytest.mark.parametrize("change, needle", [
    ({"pairs": [{"name": "p", "target": {"model": {"name": "cnn"}, "task": TASK}, "bogus": 1}]}, "pairs.0.bogus"),
    ({"search": {"recipe.optimizer.lr": {"loguniform": [-1, 0.1]}}}, "search.recipe.optimizer.lr"),
    ({"methods": {"nosuch": {}}}, "method.name"),
    ({"search": {"recipe.epochs": {"grid": [1, "many"]}}}, "recipe.epochs"),
    ({"pairs": [{"name": "p", "source": {"model": {"name": "cnn"}, "task": TASK},
                 "target": {"model": {"name": "cnn"}, "task": TASK},
                 "layer_pairs": [{"source": "missing.weight", "target": "classifier.weight"}]}]},
     "method.options.layer_pairs.0.source"),
    ({"scheduler": {"name": "asha", "metric": "target/val_accuracy"}}, "scheduler.metric"),
    ({"scheduler": {"name": "asha", "metric": "source/val_acc"}}, "scheduler.metric"),  # alone trains no source
    ({"report": {"effect_points": 0}}, "report.effect_points"),  # "seeds needed" for a gain of 0 points
    # a deciding metric that reads the test split (issue 33): refused, the field named
    ({"scheduler": {"name": "asha", "metric": "target/test_acc"}}, "scheduler.metric"),
    ({"select": {"arms": {"alone": []}, "seeds": [9], "metric": "target/test_acc_at_best_val",
                 "search": {"recipe.optimizer.lr": {"grid": [0.01, 0.1]}}}}, "select.metric"),
])
def test_malformed_grid_rejected_before_ray(tmp_path, change, needle):
    grid = tiny_grid("g-bad", **RAY_GRID)
    grid.update(change)
    path = write_yaml(tmp_path / "bad.yaml", grid)
    r = run_cli("run", path, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors and any(needle in l for l in errors), r.stderr
    assert "Traceback" not in r.stderr
    assert "Ray" not in r.stdout + r.stderr.replace(needle, "")  # Ray never started
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_every_grid_in_experiments_validates():
    from mergenet_core.config import read_yaml
    from orchestrator.cli import main

    grids = [p for p in sorted((ROOT / "experiments").glob("*.yaml"))
             if "pairs" in read_yaml(p)]
    assert any(p.name == "quickstart.yaml" for p in grids)
    assert main(["validate", *map(str, grids)]) == 0


def test_quickstart_design_validates_without_warnings(capsys):
    """The README's main command: two pairs (Fashion-MNIST, a text pair), the arms alone /
    transplant (the positive control, from a trained donor of the target's architecture that the
    grid's `sources:` train) / mergenet with the clean signal / its untrained-source control,
    >= 3 seeds, every trial inline, no bundles kept, the verdict report gated on the positive
    control; `mergenet validate` prints no warning (every target layer written is followed by a
    normalisation layer, writes keep the layer's scale)."""
    from orchestrator.cli import main
    from orchestrator.grid.load import load_grid
    from orchestrator.topology import choose

    path = ROOT / "experiments" / "quickstart.yaml"
    warnings: list[str] = []
    grid = load_grid(path, warnings=warnings)
    from mergenet_core.methods import Note

    assert [w for w in warnings if not isinstance(w, Note)] == []  # notes state the adapters' size
    assert len(grid.seeds) >= 3
    arms = {a: (grid.method_of(a), grid.methods[a].get("control", "none")) for a in grid.methods}
    assert arms["alone"] == ("alone", "none") and arms["mergenet"] == ("mergenet", "none")
    assert arms["transplant"] == ("transplant", "none") and grid.report.positive_controls == ["transplant"]
    controls = [a for a, v in arms.items() if v == ("mergenet", "untrained_source")]
    assert controls and set(arms) == {"alone", "transplant", "mergenet", *controls}
    assert grid.report.controls == controls and grid.report.verdicts == [f"mergenet:{controls[0]}"]
    assert grid.keep_bundles == "none" and grid.max_concurrent_trials == 2
    dirs = grid.source_plan()[1]
    tasks = set()
    for p in grid.pairs:
        for arm in grid.methods:
            cfg = grid.trial_config(p.name, arm, grid.seeds[0])
            assert choose(cfg).name == "inline"
            tasks.add(cfg.target.task.name)
            opts = cfg.method.options
            if cfg.method.name == "mergenet":  # the clean signal, writes at the layer's scale, a trained source
                assert opts.get("update_rule", "exact") == "exact" and opts.get("freeze_source") is True
                assert all(lp.get("output_scale", "rms") == "rms" for lp in opts["layer_pairs"])
            if cfg.method.name in ("mergenet", "transplant"):  # a donor trained first by `sources:`
                assert cfg.source.init_from.path in {str(d) for d in dirs.values()}, cfg.source
    assert {"fashion_mnist", "rotten_tomatoes"} <= tasks
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err.lower(), err


def test_grid_report_section_names_existing_arms(tmp_path):
    grid = tiny_grid("g-rep", **RAY_GRID, report={"controls": ["nosuch"]})
    r = run_cli("validate", write_yaml(tmp_path / "g.yaml", grid), cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}, timeout=120)
    assert r.returncode == 2 and "nosuch" in r.stderr and "Traceback" not in r.stderr, r.stderr


#: a console line a healthy `mergenet run` never prints (error level, traceback, Ray/Python warnings, INFO logs)
NOISE = re.compile(r"Traceback|\bERROR\b|\bWARNING\b|Warning:|\bINFO\b|\] [EW] |View detailed results|"
                   r"Configuration for experiment|tensorboard", re.IGNORECASE)


def test_run_console_is_quiet_and_keeps_no_bundles(tmp_path):
    """A healthy run prints the header, one line per trial state change, progress lines, the
    summary, the report and the MLflow link — no log noise; `keep_bundles: none` leaves no
    checkpoint behind. Run with a user's environment (the test-only Tune/Ray settings of
    conftest removed)."""
    untrained = {"method": "mergenet", **MERGENET, "control": "untrained_source"}
    grid = tiny_grid("g-quiet", **(RAY_GRID | {"seeds": (0,), "methods": {
        "alone": {}, "mergenet": MERGENET, "mergenet_untrained": untrained}}),
        keep_bundles="none", report={"controls": ["mergenet_untrained"], "verdicts": ["mergenet:mergenet_untrained"]})
    grid["pairs"][0]["layer_pairs"] = [{"source": "features.1.conv.weight", "target": "features.0.conv.weight",
                                        "mode": "svd", "rank": 2}]
    path = write_yaml(tmp_path / "grid.yaml", grid)
    user_env = dict.fromkeys(("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_DEDUP_LOGS", "MERGENET_RAY_DASHBOARD",
                              "RAY_ADDRESS", "MLFLOW_TRACKING_URI"))
    r = run_cli("run", path, cwd=tmp_path, env=user_env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert [l for l in out.splitlines() if NOISE.search(l)] == [], out[-4000:]
    assert not r.stderr.strip(), r.stderr[-3000:]
    lines = r.stdout.splitlines()
    summary = lines.index("{")  # the run's JSON summary (indented: test_bucket_storage parses it)
    assert lines[0].startswith("grid g-quiet: 3 trials")
    assert lines[1].startswith("MLflow view (trials by arm): http://127.0.0.1:5000/#/experiments/")
    state = re.compile(r"^\[\d\d:\d\d:\d\d\] (RUNNING|FINISHED|progress) ")
    assert all(state.match(l) for l in lines[2:summary]), lines[:summary]
    assert sum(" FINISHED " in l for l in lines) == 3
    assert "## Verdict" in r.stdout and "Paired differences to `mergenet_untrained`" in r.stdout
    assert lines[-1].startswith("MLflow: ") and lines[-1].endswith(
        "runs?viewStateShareKey=mergenet-g-quiet&workflowType=machine_learning")  # the saved view, nothing else
    assert len(lines) <= 100  # 3 trials: ~10 state and progress lines, the summary, ~70 lines of report
    trials = tmp_path / "runs" / "grids" / "g-quiet" / "trials"
    assert len(list(trials.iterdir())) == 3
    assert not [p for p in trials.rglob("*.pt")], list(trials.rglob("*.pt"))
    for b in trials.glob("*/pair/bundles.json"):
        assert json.loads(b.read_text()) == {}
