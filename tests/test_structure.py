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
