"""The ``mergenet`` command line: ``pairs``, clean failures of ``train``, the console script."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import cli_env, mergenet_options, run_cli, tiny_pair, write_yaml
from orchestrator.cli import main


def test_pairs_prints_both_tables_and_suggestions(capsys):
    assert main(["pairs", "resnet18", "mobilenetv2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    src = lines.index(next(l for l in lines if l.startswith("# source: resnet18")))
    tgt = lines.index(next(l for l in lines if l.startswith("# target: mobilenetv2")))
    sug = lines.index("# suggested layer pairs (source -> target)")
    assert src < tgt < sug
    src_rows, tgt_rows = lines[src + 1:tgt], lines[tgt + 1:sug]
    assert any(r.split()[0] == "fc.weight" and "(10, 512)" in r for r in src_rows)
    assert any(r.split()[0] == "layer4.1.conv2.weight" for r in src_rows)
    assert any(r.split()[0] == "classifier.weight" and "(10, 1280)" in r for r in tgt_rows)
    suggestions = [l.strip() for l in lines[sug + 1:] if l.strip()]
    assert suggestions and all(s.startswith("- {source: ") for s in suggestions)
    # normalised target layers are suggested first; the unnormalised classifier is marked
    assert not any("target: classifier.weight" in s for s in suggestions[:1])
    assert any(r.split()[0] == "classifier.weight" and "UNNORMALISED" in r for r in tgt_rows)
    # the tables list 2-D+ weights only (no biases / norm weights without --all)
    assert not any(r.split()[0].endswith(".bias") for r in src_rows + tgt_rows)


def test_pairs_unknown_model_is_a_clean_error(capsys):
    assert main(["pairs", "resnet18", "vgg16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'vgg16'" in err[0]


def test_train_missing_data_root_exits_2_with_one_line(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_pair("alone"))
    proc = run_cli("train", cfg, "--set", "target.task.options.root=/nonexistent", "--out", tmp_path / "run",
                   "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent" in lines[0], lines


def test_train_invalid_config_exits_2_before_training(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_pair("alone"))
    assert main(["train", str(cfg), "--set", "recipe.optimizer.lrr=1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: recipe.optimizer.lrr: unknown key"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options,override,field", [
    (mergenet_options(source="nope.weight"), [], "method.options.layer_pairs.0.source"),
    (mergenet_options(), ["target.recipe.batch_size=1000"], "target.recipe.batch_size"),
], ids=["unknown-parameter", "batch-larger-than-split"])
def test_train_runtime_config_errors_name_the_field(tmp_path, capsys, options, override, field):
    """Problems only found when the models/data are built still end as one field line."""
    cfg = write_yaml(tmp_path / "c.yaml", tiny_pair("mergenet", options))
    argv = ["train", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]
    for o in override:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: "), err


def test_console_script_help():
    exe = shutil.which("mergenet")
    assert exe, "the mergenet console script is not on PATH (pip install -e .)"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("validate", "train", "pairs"):
        assert cmd in proc.stdout
    proc = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0
    for flag in ("--set", "--out", "--resume", "--quiet"):
        assert flag in proc.stdout
