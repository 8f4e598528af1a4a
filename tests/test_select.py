"""A grid's search stage (`select:`): the searched arm is tuned on the validation split on its own
seeds, the winner runs the verdict grid for that arm and its controls, the report says what won,
and a second `mergenet run` reuses the search. Real local Ray, real MLflow (sqlite)."""
from __future__ import annotations

import json

import pytest

from helpers import mergenet_arm, run_cli, tiny_grid, write_yaml

MN = mergenet_arm()
TARGET = {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}}
ONE = [{"source": "features.1.conv.weight", "target": "features.1.conv.weight", "mode": "svd", "rank": 2}]
BOTH = ONE + [{"source": "features.0.conv.weight", "target": "features.0.conv.weight", "mode": "svd", "rank": 2}]


def grid(name: str, **select) -> dict:
    g = tiny_grid(
        name, epochs=1, steps_per_epoch=3, target_model=TARGET, seeds=(0,),
        methods={"alone": {}, "mergenet": MN,
                 "mergenet_untrained": {"method": "mergenet", **MN, "control": "untrained_source"}},
        keep_bundles="none", max_concurrent_trials=2,
        report={"controls": ["mergenet_untrained"], "verdicts": ["mergenet:mergenet_untrained"],
                "results_md": "docs/RESULTS.md", "section": "Select test"})
    g["pairs"][0]["layer_pairs"] = ONE
    g["select"] = {"arms": {"mergenet": ["mergenet_untrained"]}, "seeds": [100],
                   "search": {"method.options.layer_pairs": {"grid": {"one": ONE, "both": BOTH}},
                              "method.options.t_cycle": {"grid": [1, 3]}}, **select}
    return g


def user_env(uri: str) -> dict:
    """A user's environment: without conftest's test-only Tune settings (no result files -> warnings)."""
    return {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": None, "RAY_ADDRESS": None, "MLFLOW_TRACKING_URI": uri}


@pytest.mark.parametrize("change, needle", [
    ({"seeds": [0]}, "select.seeds: seed(s) [0] are also verdict seeds"),
    ({"arms": {"mergenet": ["nosuch"]}}, "select.arms: no arm(s) ['nosuch']"),
    ({"search": {"method.options.adapter.lr": {"loguniform": [1e-4, 1e-2]}}}, "give a grid"),
    ({"metric": "target/test_acc"}, "select.metric"),
])
def test_bad_select_rejected_with_one_line(tmp_path, change, needle):
    path = write_yaml(tmp_path / "g.yaml", grid("g-bad", **change))
    r = run_cli("validate", path, cwd=tmp_path, env=user_env(f"sqlite:///{tmp_path / 'm.db'}"), timeout=180)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_search_then_verdict_grid_with_the_winner(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_yaml(tmp_path / "g.yaml", grid("g-sel"))
    r = run_cli("run", path, cwd=tmp_path, env=user_env(uri), timeout=600, check=0)
    assert "Traceback" not in r.stderr and "Could not fetch" not in r.stderr, r.stderr[-3000:]
    assert "grid g-sel-select: 4 trials" in r.stdout and "grid g-sel: 3 trials" in r.stdout, r.stdout[:2000]
    sel = json.loads((tmp_path / "runs/grids/g-sel-select/selection.json").read_text())
    (best,) = sel["chosen"]
    assert best["arm"] == "mergenet" and best["inherit"] == ["mergenet_untrained"]
    assert len(best["all"]) == 4 and {tuple(sorted(c["hp"].items())) for c in best["all"]} == {
        (("method.options.layer_pairs", lp), ("method.options.t_cycle", t)) for lp in ("one", "both") for t in (1, 3)}
    means = [c["mean"] for c in best["all"]]
    assert means == sorted(means, reverse=True) and best["best"] == best["all"][0]
    # the verdict trials of the searched arm and its control run with the winner; alone does not
    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name("g-sel")
    runs = c.search_runs([exp.experiment_id], "tags.`mergenet.trial` = '1'")
    want_t = str(best["best"]["hp"]["method.options.t_cycle"])
    want_n = 1 if best["best"]["hp"]["method.options.layer_pairs"] == "one" else 2
    for run in runs:
        p = run.data.params
        if run.data.tags["mergenet.arm"] == "alone":
            continue
        assert p["method.options.t_cycle"] == want_t, p
        assert len(json.loads(p["method.options.layer_pairs"])) == want_n, p["method.options.layer_pairs"]
        assert int(run.data.tags["mergenet.seed"]) == 0  # verdict seed, never a search seed
    md = (tmp_path / "docs/RESULTS.md").read_text()
    assert "## Select test" in md and "Search on the validation split" in md and "Wall time of this" in md
    assert "## Verdict" in md or "### Verdict" in md
    # the summary over the grid: one row per arm, the primary verdict marked, the search's budget
    run_cli("summary", path, "--results-md", "docs/RESULTS.md", cwd=tmp_path, env=user_env(uri), timeout=300, check=0)
    md = (tmp_path / "docs/RESULTS.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| `g.yaml` |")]
    arm = {l.split("|")[2].strip(): l for l in rows}
    assert len(rows) == 2 and "(primary)" in arm["`mergenet`"], rows
    assert "negative control" in arm["`mergenet_untrained`"], rows
    assert "search 4 trials" in md and "Wall time of this `mergenet run`" in md
    # `mergenet report GRID.yaml` alone: the grid's own report section, with the run's account
    r4 = run_cli("report", path, cwd=tmp_path, env=user_env(uri), timeout=300)
    assert r4.returncode == 0 and "## Verdict" in r4.stdout and "Search on the validation split" in r4.stdout, \
        (r4.stdout + r4.stderr)[-3000:]
    # a second run reuses the search (and says so)
    r2 = run_cli("run", path, "--no-report", cwd=tmp_path, env=user_env(uri), timeout=600, check=0)
    assert "select: reusing the search" in r2.stdout and "grid g-sel-select" not in r2.stdout


def test_source_anchor_on_unequal_layers_rejected_before_any_work(tmp_path):
    g = grid("g-anchor")
    g["methods"]["mergenet"] = {**MN, "adapter": {**MN["adapter"], "anchor": "source"}}
    g["pairs"][0]["layer_pairs"] = [{"source": "features.1.conv.weight", "target": "features.0.conv.weight",
                                     "mode": "full"}]
    del g["select"]
    r = run_cli("validate", write_yaml(tmp_path / "g.yaml", g), cwd=tmp_path,
                env=user_env(f"sqlite:///{tmp_path / 'm.db'}"), timeout=180)
    assert r.returncode == 2 and "method.options.adapter.anchor" in r.stderr and "Traceback" not in r.stderr, r.stderr
