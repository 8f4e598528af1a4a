"""The GPU suite (benchmarks/gpu_suite.py) between the rare GPU runs: its CPU dry run (every
part, tiny shapes, CUDA-only branches skipped with a message), its import path (no Ray, MLflow
or transformers), and its start-up check of the carried wheels."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_runs_every_part_on_cpu_and_imports_no_ray_mlflow_or_transformers(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- gpu_suite:start -->\nold\n<!-- gpu_suite:end -->\n\ntail\n")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--json", str(out), "--out", str(md)], cwd=tmp_path,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["machine"]["device"] == "cpu"
    assert res["imported_banned"] == []  # the suite's own check of sys.modules at its end
    c = res["cuda_path"]
    assert c["all_finite"] and {"fp32", "fp32 again", "channels_last"} <= c["runs"].keys()
    assert c["fp32_repeat"]["within"]  # on a CPU the repeat is exact
    t = res["throughput"]
    assert {"plain", "plain, no transfer", "engine", "engine, no transfer"} == t["rows"].keys()
    assert all(v["pair_steps_per_s"] > 0 for v in t["rows"].values())
    assert [row["processes"] for row in res["packing"]["rows"]] == [1, 2]
    # the CUDA-only branches: each a printed "skipped:" line and a JSON entry, never silent
    skipped = [l.strip() for l in r.stdout.splitlines() if l.strip().startswith("skipped: ")]
    assert len(skipped) == len(res["skipped"]) == 4, r.stdout
    assert any("bf16" in s for s in skipped) and any("role streams" in s for s in skipped)
    text = md.read_text()
    assert "old" not in text and text.endswith("tail\n") and "## GPU suite" in text and "dry run" in text
    # a stored result (as fetched back from the GPU machine) renders the same section, without torch
    again = tmp_path / "AGAIN.md"
    r = subprocess.run([sys.executable, str(SUITE), "--render", str(out), "--out", str(again)], cwd=tmp_path,
                       env=cli_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    a = again.read_text()  # a new file: the benchmarks' header, then the section
    assert a.startswith("# Benchmarks\n")
    assert a[a.index("<!-- gpu_suite:start"):].strip() == text[text.index("<!-- gpu_suite:start"):text.index("tail")].strip()


def test_missing_packages_are_listed_with_the_fetch_line_not_a_traceback(tmp_path):
    code = (f"import runpy, sys; sys.argv = ['gpu_suite.py', '--dry-run']; "
            f"g = runpy.run_path({str(SUITE)!r}, run_name='not_main'); "
            "g['REQUIRED']['no_such_module_xyz'] = 'no-such-dist'; sys.exit(g['main'](['--dry-run']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert "missing Python packages: no-such-dist" in r.stderr and "pip download --only-binary=:all:" in r.stderr


def test_carried_wheels_are_unpacked_and_importable(tmp_path):
    suite = _suite()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_mod_xyz-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_mod_xyz/__init__.py", "VALUE = 42\n")
    site = tmp_path / "site"
    try:
        used = suite.use_carried_wheels(wheels, site, names=("fake_mod_xyz",))
        assert used == ["fake_mod_xyz-1.0-py3-none-any.whl"]
        import fake_mod_xyz

        assert fake_mod_xyz.VALUE == 42
        assert suite.missing_modules(("fake_mod_xyz", "yaml")) == []
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("fake_mod_xyz", None)
