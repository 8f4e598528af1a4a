"""A run folder has one writer (mergenet_core/io/outputs.py): no other module of the package
writes ``config.json``, ``metrics.jsonl``, ``final.json``, ``placement.json`` or
``bundles.json``, so their names and formats cannot drift between hosts."""
from __future__ import annotations

import ast
from helpers import ROOT
from mergenet_core.io import BUNDLES, CONFIG, FINAL, METRICS, PLACEMENT
from mergenet_core.io.outputs import RunOutputs, summarise
NAMES = {BUNDLES, CONFIG, FINAL, METRICS, PLACEMENT}
CONSTANTS = {"BUNDLES", "CONFIG", "FINAL", "METRICS", "PLACEMENT"}
WRITERS = {"write_text", "write_bytes", "write_atomic", "write_metrics", "copy2", "copy", "copyfile"}


def _names_an_output(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and n.value in NAMES:
            return True
        if isinstance(n, ast.Name) and n.id in CONSTANTS:
            return True
    return False


def test_one_writer_of_run_outputs():
    offenders = []
    for pkg in ("mergenet_core", "orchestrator"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "mergenet_core" / "io" / "outputs.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name not in WRITERS:
                    continue
                if name in ("write_text", "write_bytes"):  # (out / FINAL).write_text(...)
                    target = [f.value]
                elif name.startswith("copy"):  # shutil.copy2(src, out / PLACEMENT)
                    target = node.args[1:2]
                else:  # write_atomic(out / FINAL, ...)
                    target = node.args[:1]
                if any(_names_an_output(t) for t in target):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_outputs_round_trip(tmp_path):
    from helpers import tiny_pair
    from mergenet_core.config import ExperimentConfig

    cfg = ExperimentConfig.model_validate(tiny_pair("alone", source_model=None))
    out = RunOutputs(tmp_path / "run")
    history = [{"epoch": 1, "step": 3, "target/val_acc": 0.5, "target/test_acc": 0.4, "time/epoch_s": 1.0},
               {"epoch": 2, "step": 6, "target/val_acc": 0.4, "target/test_acc": 0.6, "time/epoch_s": 2.0}]
    out.begin(cfg, fresh=True, history=history[:1])
    assert out.read_history() == history[:1]
    final = out.finish(history=history, kept={"last": {"epoch": 2, "path": "x"}}, placement=[{"role": "pair"}])
    # best validation is epoch 1 (never best on test), the final epoch is 2
    assert final == {"epochs": 2, "steps": 6, "target/final_test_acc": 0.6, "target/final_val_acc": 0.4,
                     "target/best_val_acc": 0.5, "target/best_val_epoch": 1, "target/test_acc_at_best_val": 0.4,
                     "wall_s": 3.0}
    assert summarise(history) == final and out.read_history() == history
    assert ExperimentConfig.model_validate_json((out.out / CONFIG).read_text()) == cfg
    out.no_bundles()
    assert (out.out / BUNDLES).read_text().strip() == "{}"
    out.begin(cfg, fresh=True)  # a fresh run leaves no previous summary or history behind
    assert not (out.out / FINAL).exists() and out.read_history() == []
