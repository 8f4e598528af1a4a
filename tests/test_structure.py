"""The orchestrator's shape, as docs/ARCHITECTURE.md draws it: no import cycle anywhere in the
package (imports inside functions and under ``TYPE_CHECKING`` count too), no file over 400 lines,
no function over 50."""
from __future__ import annotations

import helpers


def test_orchestrator_has_no_import_cycle():
    helpers.assert_no_import_cycle("orchestrator")


def _sizes():
    import ast

    for f in sorted((helpers.ROOT / "orchestrator").rglob("*.py")):
        text = f.read_text()
        yield f, None, len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f, node.name, node.end_lineno - node.lineno + 1


def test_no_orchestrator_file_over_400_lines_or_function_over_50():
    """A function does one thing you can read on one screen; a module holds one concern."""
    long = [f"{f.relative_to(helpers.ROOT)}{':' + name if name else ''} ({n} lines)" for f, name, n in _sizes()
            if n > (50 if name else 400)]
    assert not long, long


#: modules whose code runs in a trial process, a Ray Train worker or the adapter actor
TRIAL_SIDE = ["orchestrator/grid/trial.py", "orchestrator/topology"]
#: the calls that build a config from data
PARSES = {"parse_config", "load_config", "model_validate", "model_validate_json", "trial_config", "load_grid"}


def test_trial_processes_receive_configs_and_never_parse_one():
    """Each trial is resolved once in the driver (orchestrator/grid/spec.py): the trial driver,
    the topologies, the Train workers and the adapter actor receive the validated config object.
    The one exception is a trial whose search values PBT mutated (``spec.for_trial``)."""
    import ast

    found = []
    for place in TRIAL_SIDE:
        root = helpers.ROOT / place
        for f in ([root] if root.is_file() else sorted(root.rglob("*.py"))):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "attr", getattr(node.func, "id", None))
                    if name in PARSES:
                        found.append(f"{f.relative_to(helpers.ROOT)}:{node.lineno} {name}")
    assert not found, found
