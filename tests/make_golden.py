"""Write tests/golden/step_metrics.json: :func:`helpers.step_metrics` for every
``test_method_contract.GOLDEN_CASES`` row, which ``test_metrics_equal_recorded`` checks.

Run from the repository root with the constraints.txt pins and one thread, only on purpose
(the file is what a refactor must reproduce)::

    OMP_NUM_THREADS=1 python tests/make_golden.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's packages, then tests/helpers.py

from helpers import limit_threads, step_metrics  # noqa: E402
from test_method_contract import GOLDEN, GOLDEN_CASES  # noqa: E402


def main() -> None:
    limit_threads()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(GOLDEN_CASES):
            out[name] = step_metrics(GOLDEN_CASES[name], Path(tmp) / name)
            print(name, len(out[name]["steps"]), "steps", flush=True)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
