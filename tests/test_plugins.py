"""Bring your own code: plugins from a config's ``plugins:`` (a module or a ``.py`` file outside the
repository) and from installed entry points, seen by ``validate``, ``pairs`` and ``train``; bad
plugins are one error line; data and weight paths resolved against the config file, not the
working directory."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from helpers import TINY_RECIPE, fmnist_task, run_cli, write_yaml

LAB_PLUGIN = '''
"""A researcher's own model, registered from outside the repository."""
from pydantic import BaseModel, ConfigDict
from torch import nn

from mergenet_core.models import MODELS


class LabOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = 16


class LabNet(nn.Module):
    def __init__(self, info, hidden):
        super().__init__()
        self.conv = nn.Conv2d(info.in_channels, hidden, 3, padding=1)
        self.bn = nn.BatchNorm2d(hidden)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(hidden, info.num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.bn(self.conv(x)).relu()).flatten(1))


@MODELS.register("lab_net", LabOptions, modality="image")
def lab_net(opts, info):
    return LabNet(info, opts.hidden)
'''


def _lab(tmp_path: Path, plugin: str = LAB_PLUGIN, name: str = "lab_models.py") -> Path:
    """A lab folder outside the repository: the plugin file and a pair config that names it
    relative to itself; returns the config's path."""
    lab = tmp_path / "lab"
    lab.mkdir(exist_ok=True)
    (lab / name).write_text(textwrap.dedent(plugin))
    task = fmnist_task(train=128, test=64)
    return write_yaml(lab / "pair.yaml", {
        "name": "lab", "device": "cpu", "plugins": [name], "recipe": {**TINY_RECIPE, "steps_per_epoch": 2},
        "source": {"model": {"name": "cnn", "options": {"channels": [8], "hidden": 0}}, "task": task},
        "target": {"model": {"name": "lab_net", "options": {"hidden": 8}}, "task": task},
        "method": {"name": "kd"}})


def test_a_plugin_file_outside_the_repository_is_seen_by_every_command(tmp_path):
    cfg = _lab(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli("validate", cfg, cwd=elsewhere, check=0)
    r = run_cli("pairs", "--config", cfg, cwd=elsewhere, check=0)
    assert "# target: lab_net" in r.stdout and "conv.weight" in r.stdout
    r = run_cli("train", cfg, "--out", tmp_path / "out", "--quiet", cwd=elsewhere, timeout=300, check=0)
    final = json.loads((tmp_path / "out" / "final.json").read_text())
    assert 0.0 <= final["target/final_test_acc"] <= 1.0
    # without the plugin the model is unknown, and the error says which names exist
    r = run_cli("pairs", "cnn", "lab_net", cwd=elsewhere, check=2)
    assert "unknown model 'lab_net'" in r.stderr
    r = run_cli("pairs", "cnn", "lab_net", "--plugin", cfg.parent / "lab_models.py", cwd=elsewhere, check=0)


def test_the_installed_console_script_sees_a_plugin_from_another_directory(tmp_path):
    """``mergenet`` as pip installed it (its console script, no checkout on PYTHONPATH)."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("mergenet", path=os.path.dirname(sys.executable)) or shutil.which("mergenet")
    if exe is None:
        pytest.skip("mergenet is not installed in this environment (pip install -e .)")
    cfg = _lab(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([exe, "validate", str(cfg)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"ok: {cfg}"), r.stdout + r.stderr


@pytest.mark.parametrize("plugin, needle", [
    ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("from mergenet_core.models import MODELS\n"
     "@MODELS.register('smelly', modality='smell')\ndef smelly(opts, info):\n    return None\n",
     "model 'smelly': modality= must be one of"),
    ("from mergenet_core.models import MODELS\n"
     "@MODELS.register('cnn', modality='image')\ndef cnn(opts, info):\n    return None\n",
     "model 'cnn' registered twice"),
])
def test_a_bad_plugin_is_one_line_naming_it(tmp_path, plugin, needle):
    cfg = _lab(tmp_path, plugin, name="bad_plugin.py")
    for cmd in (("validate", cfg), ("train", cfg, "--out", tmp_path / "o")):
        r = run_cli(*cmd, cwd=tmp_path, check=2)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "plugins: plugin '" in lines[0] and "bad_plugin.py" in lines[0] and needle in lines[0], lines[0]


def test_an_installed_entry_point_registers_without_any_config(tmp_path):
    """A package installed with an entry point in ``mergenet.plugins`` (here a dist-info folder on
    the path, as pip writes it) registers its entries in every process."""
    site = tmp_path / "site"
    (site / "labpkg").mkdir(parents=True)
    (site / "labpkg" / "__init__.py").write_text(textwrap.dedent(LAB_PLUGIN).replace("lab_net", "lab_ep_net"))
    info = site / "labpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: labpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mergenet.plugins]\nlab = labpkg\n")
    from helpers import ROOT

    r = run_cli("pairs", "cnn", "lab_ep_net", "--target-options", "{hidden: 4}", cwd=tmp_path,
                env={"PYTHONPATH": f"{ROOT}:{site}"}, check=0)
    assert "# target: lab_ep_net {'hidden': 4}" in r.stdout


def test_data_and_weight_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    from mergenet_core.config import ConfigErrors
    from orchestrator.config import load_config

    lab = tmp_path / "lab"
    (lab / "data").mkdir(parents=True)
    (lab / "data" / "fm").symlink_to("/usr/share/datasets/fashion-mnist")
    task = fmnist_task(train=64, test=32, root="data/fm")
    pair = {"device": "cpu", "recipe": TINY_RECIPE, "target": {"model": {"name": "cnn"}, "task": task}}
    write_yaml(lab / "pair.yaml", pair)
    monkeypatch.chdir(tmp_path)  # not the config's folder
    monkeypatch.delenv("MERGENET_DATA", raising=False)
    cfg = load_config(lab / "pair.yaml")
    assert cfg.target.task.options["root"] == str((lab / "data" / "fm").resolve())
    # under $MERGENET_DATA: named explicitly, or a relative root missing beside the file
    monkeypatch.setenv("MERGENET_DATA", str(lab / "data"))
    for root in ("$MERGENET_DATA/fm", "${MERGENET_DATA}/fm", "fm"):
        pair["target"]["task"]["options"]["root"] = root
        write_yaml(lab / "pair.yaml", pair)
        assert load_config(lab / "pair.yaml").target.task.options["root"] == str((lab / "data" / "fm").resolve())
    monkeypatch.delenv("MERGENET_DATA")
    pair["target"]["task"]["options"]["root"] = "$MERGENET_DATA/fm"
    write_yaml(lab / "pair.yaml", pair)
    with pytest.raises(ConfigErrors, match=r"target\.task\.options\.root: \$MERGENET_DATA/fm: \$MERGENET_DATA is not set"):
        load_config(lab / "pair.yaml")
    pair["target"]["task"]["options"]["root"] = "nowhere"
    write_yaml(lab / "pair.yaml", pair)
    # --set values are relative to where the command runs
    cfg = load_config(lab / "pair.yaml", ["target.task.options.root=lab/data/fm"])
    assert cfg.target.task.options["root"] == str((lab / "data" / "fm").resolve())


def test_a_plugin_model_runs_in_the_split_topologys_workers_and_adapter_actor(tmp_path):
    """``mergenet train --ray``: the source and the target in their own Ray Train workers and the
    adapter in its actor, each a process that imports the config's plugin before it builds."""
    from mergenet_core.config import read_yaml

    cfg = _lab(tmp_path)
    data = read_yaml(cfg)
    data["method"] = {"name": "mergenet", "options": {"t_cycle": 1, "adapter": {"layers": 1, "heads": 2},
                                                      "layer_pairs": [{"source": "classifier.weight",
                                                                       "target": "classifier.weight", "rank": 2}]}}
    data["ray"] = {"topology": "split", "cpus_per_worker": 0.5}
    cfg = write_yaml(cfg, data)
    run_cli("train", cfg, "--ray", "--out", tmp_path / "out", "--quiet", cwd=tmp_path, timeout=600, check=0)
    final = json.loads((tmp_path / "out" / "final.json").read_text())
    assert final["steps"] == 2 and 0.0 <= final["target/final_test_acc"] <= 1.0


def test_a_sources_cache_key_follows_its_plugin_files_content(tmp_path):
    """A grid's source trained with a plugin model is another source once the plugin file changes
    (its cache folder is keyed by the file's content, not its path)."""
    from orchestrator.config import load_config
    from orchestrator.grid.sources import source_key

    cfg = _lab(tmp_path)
    before = source_key(load_config(cfg))
    plugin = cfg.parent / "lab_models.py"
    plugin.write_text(plugin.read_text() + "\n# a changed model\n")
    assert source_key(load_config(cfg)) != before
