"""Config validation through the real CLI: every malformed config exits 2 with one
``error: FILE: field.path: problem`` line naming the culprit; extends / --set / role recipes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import ROOT, mergenet_options, run_cli, tiny_pair, write_yaml
from mergenet_core.config.checks import method_options
from mergenet_core.config import ConfigErrors
from orchestrator.config import load_config
from orchestrator.cli import main

PAIR_KD = {"name": "cifar10", "options": {"root": "/nonexistent/cifar"}}

def replace(data: dict, path: str, value) -> dict:
    """Set ``data[a][b]... = value`` (no deep merge) and return ``data``."""
    *head, last = path.split(".")
    cur = data
    for p in head:
        cur = cur[p]
    cur[last] = value
    return data


# (case id, config dict or raw YAML text, --set overrides, field path the error must name)
MALFORMED = [
    ("unknown-top-level-key", tiny_pair(bogus=1), [], "bogus"),
    ("unknown-nested-key", tiny_pair(recipe={"optimizer": {"lrr": 0.1}}), [], "recipe.optimizer.lrr"),
    ("wrong-type", tiny_pair(recipe={"epochs": "ten"}), [], "recipe.epochs"),
    ("hang-beat-slower-than-floor", tiny_pair(ray={"hang": {"floor_s": 4, "interval_s": 3}}), [],
     "ray.hang.interval_s"),
    ("hang-zero-floor", tiny_pair(), ["ray.hang.floor_s=0"], "ray.hang.floor_s"),
    ("hang-floor-below-default-beat", tiny_pair(ray={"hang": {"floor_s": 1}}), [], "ray.hang.interval_s"),
    ("negative-lr", tiny_pair(recipe={"optimizer": {"lr": -0.1}}), [], "recipe.optimizer.lr"),
    ("role-recipe-wrong-type", tiny_pair(target={"recipe": {"batch_size": "big"}}), [],
     "target.recipe.batch_size"),
    ("unknown-model", tiny_pair(target_model={"name": "resnet99"}), [], "target.model.name"),
    ("unknown-model-option", tiny_pair(target_model={"name": "resnet18", "options": {"widht": 8}}), [],
     "target.model.options.widht"),
    ("unknown-task", tiny_pair(target={"task": {"name": "mnist"}}), [], "target.task.name"),
    ("bad-task-image-size", tiny_pair(target={"task": {"options": {"image_size": 5}}}), [],
     "target.task.options.image_size"),
    ("bad-task-channels", tiny_pair(source={"task": {"options": {"channels": 2}}}), [],
     "source.task.options.channels"),
    ("modality-mismatch", replace(tiny_pair(), "target.task", {"name": "rotten_tomatoes"}), [],
     "target.model.name"),
    ("unknown-method", tiny_pair(method="mergnet"), [], "method.name"),
    ("mergenet-without-layer-pairs", tiny_pair("mergenet", {"t_cycle": 1}), [], "method.options.layer_pairs"),
    ("mergenet-bad-update-rule", tiny_pair("mergenet", mergenet_options(update_rule="sideways")), [],
     "method.options.update_rule"),
    ("mergenet-bad-t-cycle", tiny_pair("mergenet", mergenet_options(t_cycle=0)), [], "method.options.t_cycle"),
    ("layer-pair-unknown-key", tiny_pair("mergenet", mergenet_options(
        layer_pairs=[{"source": "classifier.weight", "target": "classifier.weight", "rnak": 2}])), [],
     "method.options.layer_pairs.0.rnak"),
    ("kd-different-tasks", replace(tiny_pair("kd"), "source.task", PAIR_KD), [], "method.name"),
    ("dml-different-task-options", tiny_pair("dml", source={"task": {"options": {"image_size": 32}}}), [],
     "method.name"),
    ("bf16-on-cpu", tiny_pair(precision="bf16", device="cpu"), [], "precision"),
    ("kd-without-source", tiny_pair("kd", source_model=None), [], "source"),
    ("mergenet-without-source", tiny_pair("mergenet", mergenet_options(), source_model=None), [], "source"),
    ("param-share-empty-pairs", tiny_pair("param_share", {"layer_pairs": []}), [], "method.options.layer_pairs"),
    ("set-bad-value-type", tiny_pair(), ["recipe.epochs=ten"], "recipe.epochs"),
    ("set-bad-list-index", tiny_pair("mergenet", mergenet_options()), ["method.options.layer_pairs.3.rank=8"],
     "method.options.layer_pairs.3"),
    ("set-without-equals", tiny_pair(), ["recipe.epochs"], "--set"),
    ("extends-missing-file", {"extends": "missing_base.yaml", "seed": 1}, [], "extends"),
    ("extends-not-a-name", {"extends": 5, "seed": 1}, [], "extends"),
    # gaps closed by issue 14: each used to pass validate and fail (or misbehave) later
    ("adapter-heads-too-many", tiny_pair("mergenet", mergenet_options()), ["method.options.adapter.heads=1000"],
     "method.options.adapter.heads"),
    ("negative-conv-channels", tiny_pair(target_model={"name": "cnn", "options": {"channels": [-3, 8]}}), [],
     "target.model.options.channels.0"),
    ("zero-conv-channels", tiny_pair(source_model={"name": "cnn", "options": {"channels": [8, 0]}}), [],
     "source.model.options.channels.1"),
    ("val-fraction-zero", tiny_pair(), ["target.task.options.val_fraction=0"], "target.task.options.val_fraction"),
    ("name-with-path-separator", tiny_pair(name="../../etc/x"), [], "name"),
    ("name-absolute-path", tiny_pair(name="/tmp/x"), [], "name"),
    ("layer-pairs-one-target-two-ranks", tiny_pair("mergenet", mergenet_options(layer_pairs=[
        {"source": "classifier.weight", "target": "classifier.weight", "rank": 2},
        {"source": "hidden.weight", "target": "classifier.weight", "rank": 3}])), [],
     "method.options.layer_pairs.1.rank"),
    ("layer-pairs-one-target-two-modes", tiny_pair("mergenet", mergenet_options(layer_pairs=[
        {"source": "classifier.weight", "target": "hidden.weight", "mode": "learned"},
        {"source": "hidden.weight", "target": "hidden.weight", "mode": "svd"}])), [],
     "method.options.layer_pairs.1.mode"),
]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def run_validate(capsys, path: Path, overrides=()) -> tuple[int, list[str]]:
    argv = ["validate", str(path)]
    for o in overrides:
        argv += ["--set", o]
    rc = main(argv)
    return rc, error_lines(capsys.readouterr().err)


@pytest.mark.parametrize("case,data,overrides,field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_config_names_field(tmp_path, capsys, case, data, overrides, field):
    path = write_yaml(tmp_path / f"{case}.yaml", data)
    rc, lines = run_validate(capsys, path, overrides)
    assert rc == 2, lines
    assert lines, "no error line on stderr"
    prefix = f"error: {path}: "
    assert all(line.startswith(prefix) for line in lines), lines
    fields = [line[len(prefix):].split(": ", 1)[0] for line in lines]
    assert field in fields, lines
    # an error in the top-level recipe is reported once, not again for every role
    assert len(lines) == len(set(lines)) and len(lines) <= 2, lines


def test_invalid_yaml_names_line(tmp_path, capsys):
    path = write_yaml(tmp_path / "broken.yaml", "name: x\ntarget: {model: [1, 2\n")
    rc, lines = run_validate(capsys, path)
    assert rc == 2
    assert len(lines) == 1 and "invalid YAML" in lines[0] and "line" in lines[0], lines
    assert lines[0].count(str(path)) == 1, lines  # the file is named once, not twice


def test_validate_reports_every_file(tmp_path, capsys):
    good = write_yaml(tmp_path / "good.yaml", tiny_pair())
    bad = write_yaml(tmp_path / "bad.yaml", tiny_pair(bogus=1))
    rc = main(["validate", str(good), str(bad)])
    out = capsys.readouterr()
    assert rc == 2
    assert f"ok: {good}" in out.out
    assert error_lines(out.err) == [f"error: {bad}: bogus: unknown key"]


def test_several_errors_in_one_file_all_reported(tmp_path, capsys):
    path = write_yaml(tmp_path / "many.yaml", tiny_pair(bogus=1, recipe={"epochs": 0}, seed="x"))
    rc, lines = run_validate(capsys, path)
    assert rc == 2
    assert all(line.startswith(f"error: {path}: ") for line in lines), lines
    problems = dict(line[len(f"error: {path}: "):].split(": ", 1) for line in lines)
    assert len(problems) == len(lines) == 3, lines  # one line per culprit, nothing else
    assert problems["bogus"] == "unknown key"
    assert "greater than 0" in problems["recipe.epochs"] and "integer" in problems["seed"], problems


SUBPROCESS_CASES = [
    ("unknown-top-level-key", tiny_pair(bogus=1), "bogus"),
    ("invalid-yaml", "target: [1, 2\n", "invalid YAML"),
    ("extends-missing-file", {"extends": "nowhere/base.yaml"}, "extends"),
    ("unknown-model-option", tiny_pair(target_model={"name": "cnn", "options": {"widht": 8}}),
     "target.model.options.widht"),
]


def test_validate_subprocess_exit_code_and_no_traceback(tmp_path):
    paths = [write_yaml(tmp_path / f"{c}.yaml", d) for c, d, _ in SUBPROCESS_CASES]
    proc = run_cli("validate", *map(str, paths))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == len(SUBPROCESS_CASES), lines
    for (case, _, needle), path, line in zip(SUBPROCESS_CASES, paths, lines):
        assert line.startswith(f"error: {path}: ") and needle in line, (case, line)


def test_validate_subprocess_ok(tmp_path):
    # a BatchNorm-followed target layer: no layer-pair warning on stderr
    opts = mergenet_options(source="features.1.conv.weight", target="features.1.conv.weight")
    path = write_yaml(tmp_path / "good.yaml", tiny_pair("mergenet", opts))
    proc = run_cli("validate", str(path), "--set", "method.options.t_cycle=2")
    assert proc.returncode == 0, proc.stderr
    note, ok = proc.stdout.strip().splitlines()  # the adapters' size stated, then ok
    assert ok == f"ok: {path}"
    assert note.startswith(f"note: {path}: method.options.adapter: 1 adapter(s), ") and "trainable parameters" in note
    assert proc.stderr == ""


# ------------------------------------------------------------------ positives


def test_extends_deep_merges(tmp_path):
    base = tiny_pair("mergenet", mergenet_options(), name="base", seed=7)
    write_yaml(tmp_path / "bases" / "base.yaml", base)
    write_yaml(tmp_path / "mid.yaml", {"extends": "bases/base.yaml", "recipe": {"epochs": 3}})
    child = write_yaml(tmp_path / "child.yaml", {
        "extends": ["mid.yaml"],
        "name": "child",
        "recipe": {"optimizer": {"lr": 0.01}},
        "target": {"model": {"options": {"hidden": 16}}},
    })
    cfg = load_config(child)
    assert cfg.name == "child"                                # child wins
    assert cfg.seed == 7                                      # base kept
    assert cfg.recipe.optimizer.lr == 0.01                    # child wins, deep inside
    assert cfg.recipe.optimizer.momentum == 0.9               # sibling of an overridden key kept
    assert cfg.recipe.epochs == 3                             # from the middle file
    assert cfg.recipe.batch_size == 32                        # from the base
    assert cfg.target.model.options == {"channels": [8, 16], "hidden": 16}
    assert cfg.target.recipe.optimizer.lr == 0.01 and cfg.source.recipe.epochs == 3
    assert method_options(cfg).layer_pairs[0].rank == 2


def test_extends_circular(tmp_path, capsys):
    write_yaml(tmp_path / "a.yaml", {"extends": "b.yaml"})
    b = write_yaml(tmp_path / "b.yaml", {"extends": "a.yaml"})
    rc, lines = run_validate(capsys, b)
    assert rc == 2 and len(lines) == 1 and "circular" in lines[0], lines


def test_set_overrides_are_typed_and_support_list_indices(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_pair("mergenet", mergenet_options()))
    cfg = load_config(path, ["method.options.layer_pairs.0.rank=8", "recipe.optimizer.lr=0.2",
                             "method.options.adapter.lr=1e-4", "seed=3", "recipe.augment=false",
                             "target.model.options.channels=[4, 8, 16]"])
    opts = method_options(cfg)
    assert opts.layer_pairs[0].rank == 8 and isinstance(opts.layer_pairs[0].rank, int)
    assert opts.layer_pairs[0].source == "classifier.weight"      # siblings in the list item kept
    assert opts.adapter.lr == pytest.approx(1e-4)
    assert cfg.seed == 3
    assert cfg.recipe.optimizer.lr == 0.2 and cfg.target.recipe.optimizer.lr == 0.2
    assert cfg.recipe.augment is False and cfg.source.recipe.augment is False
    assert cfg.target.model.options["channels"] == [4, 8, 16]
    with pytest.raises(ConfigErrors) as e:
        load_config(path, ["method.options.layer_pairs.0.rank=eight"])
    assert [line.split(":")[0] for line in e.value.lines] == ["method.options.layer_pairs.0.rank"]


def test_role_recipe_overrides_deep_merge(tmp_path):
    data = tiny_pair("kd", recipe={"epochs": 2, "optimizer": {"lr": 0.05, "momentum": 0.8}},
                     source={"recipe": {"optimizer": {"lr": 0.01}, "label_smoothing": 0.1}})
    cfg = load_config(write_yaml(tmp_path / "c.yaml", data))
    s, t = cfg.source.recipe, cfg.target.recipe
    assert s.optimizer.lr == 0.01 and s.label_smoothing == 0.1      # role overrides
    assert s.optimizer.momentum == 0.8 and s.epochs == 2            # top-level values kept
    assert s.batch_size == 32 and s.schedule.name == "cosine"
    assert t.optimizer.lr == 0.05 and t.label_smoothing == 0.0      # other role untouched
    assert t == cfg.recipe
    # --set on a role's recipe only touches that role
    cfg = load_config(write_yaml(tmp_path / "c.yaml", data), ["target.recipe.batch_size=16"])
    assert cfg.target.recipe.batch_size == 16 and cfg.source.recipe.batch_size == 32
    assert cfg.recipe.batch_size == 32


def test_resolved_config_json_round_trips(tmp_path):
    """config.json (what ``mergenet train`` writes) validates back to the same config."""
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_pair("mergenet", mergenet_options())))
    again = load_config(write_yaml(tmp_path / "again.yaml", yaml.safe_load(cfg.model_dump_json())))
    assert again == cfg


EXPERIMENTS = sorted((ROOT / "experiments").glob("**/*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[str(p.relative_to(ROOT / "experiments")) for p in EXPERIMENTS])
def test_experiment_pair_configs_validate(path, capsys):
    if "pairs" in (yaml.safe_load(path.read_text()) or {}):
        pytest.skip("grid config (validated with the grid tests)")
    rc, lines = run_validate(capsys, path)
    assert rc == 0, lines
