"""docs/BRING_YOUR_OWN.md's recipes are valid configs: every ```yaml block whose first line is
``# recipe: FILE`` is written as ``lab/FILE``, beside the doc's plugin files (```python blocks
whose first line is ``# file: NAME.py``), with stand-in data, weights and model folders placed at
the paths the recipes name (relative to ``lab/``, or under ``$MERGENET_DATA``); then
``mergenet validate`` (fast) accepts every recipe, run from another directory. The recipes'
text is never edited.

Stand-ins: Fashion-MNIST written as an image folder (``helpers.fmnist_image_folder``) and as
NumPy arrays and ``save_to_disk`` data sets; a few rows of text as a CSV and a ``save_to_disk``
data set; weights files with the named architectures' tensor names and shapes (zeros); the
bundled MiniLM-L6 folder as both Hugging Face models (the BERT-base stand-in's ``config.json``
says 12 layers, so that the recipe's layer 11 exists; fast validation reads no weights)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import ROOT, fmnist_image_folder, run_cli

DOC = ROOT / "docs" / "BRING_YOUR_OWN.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
#: the recipes the doc must hold (a recipe renamed, dropped or added is noticed here)
RECIPES = {"r18_mbv2.yaml", "r18_mbv2_grid.yaml", "timm_r50_r18.yaml", "bert_minilm.yaml", "cifar100_hf.yaml",
           "ag_news.yaml", "lab_pair.yaml", "npy_pair.yaml", "imagenet_grid.yaml"}
PLUGINS = {"lab_models.py", "lab_tasks.py"}
IMAGENET = dict(name="imagenet", modality="image", num_classes=1000, in_channels=3, image_size=32)
#: what the recipes need beyond the core install (install.sh installs them: extras vision, timm, hf, data)
MISSING = [m for m in ("torchvision", "timm", "datasets", "transformers", "PIL") if importlib.util.find_spec(m) is None]


def _blocks(lang: str, marker: str) -> dict[str, str]:
    """NAME -> text of the doc's ``lang`` code blocks whose first line is ``# MARKER: NAME``."""
    out = {}
    for kind, text in FENCE.findall(DOC.read_text()):
        first = re.match(rf"# {marker}: (\S+)\n", text)
        if kind == lang and first:
            assert first.group(1) not in out, f"two blocks named {first.group(1)}"
            out[first.group(1)] = text
    return out


def _weights(path: Path, library: str, name: str) -> None:
    """A weights file of ``library``'s ``name`` for 1000 classes (ImageNet): its tensor names and
    shapes, zeros; ``.safetensors`` or ``torch.save``."""
    from mergenet_core.data.base import TaskInfo
    from mergenet_core.models import build_model_shapes

    state = {k: torch.zeros(v.shape, dtype=v.dtype)
             for k, v in build_model_shapes(library, {"name": name}, TaskInfo(**IMAGENET)).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _plugin(path: Path, monkeypatch):
    """The plugin file imported as a module with its registrations left out (the test process's
    registries stay as they are)."""
    from mergenet_core.data import TASKS
    from mergenet_core.models import MODELS

    for registry in (MODELS, TASKS):
        monkeypatch.setattr(registry, "register", lambda *a, **k: (lambda fn: fn))
    spec = importlib.util.spec_from_file_location(f"doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fmnist(n: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    from mergenet_core.data.images import FMNIST_ROOT, read_idx

    prefix = "train" if split == "train" else "t10k"
    x = read_idx(Path(FMNIST_ROOT) / f"{prefix}-images-idx3-ubyte.gz", 0x803)[:n]
    y = read_idx(Path(FMNIST_ROOT) / f"{prefix}-labels-idx1-ubyte.gz", 0x801)[:n].astype(np.int64)
    return x, y


def _texts(n: int, offset: int = 0) -> list[str]:
    words = ["a quiet", "a loud", "an odd", "a warm", "a long", "a short", "a bright", "a slow"]
    return [f"{words[i % len(words)]} story, number {i + offset}, told twice" for i in range(n)]


def _hf_data(lab: Path) -> None:
    """``data/cifar100`` (``img`` images, ``fine_label`` classes) and ``data/ag_news`` (``text``,
    ``label`` classes) as ``save_to_disk`` writes them, train and test splits."""
    import datasets
    from PIL import Image

    from mergenet_core.data.images import FMNIST_CLASSES

    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=FMNIST_CLASSES),
                                  "coarse_label": datasets.Value("int64")})
    splits = {}
    for split, n in (("train", 300), ("test", 60)):
        x, y = _fmnist(n, split)
        splits[split] = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(a) for a in x], "fine_label": y.tolist(), "coarse_label": (y % 2).tolist()},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(lab / "data" / "cifar100"))
    news = datasets.Features({"text": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])})
    datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"text": _texts(n, off), "label": [i % 4 for i in range(n)]}, features=news)
        for split, n, off in (("train", 160, 0), ("test", 40, 1000))}).save_to_disk(str(lab / "data" / "ag_news"))


def _hf_models(lab: Path) -> None:
    """``models/all-MiniLM-L6-v2``: the bundled MiniLM-L6 folder; ``models/bert-base-uncased``: its
    files, with a 12-layer ``config.json``."""
    from mergenet_core.data.text import minilm_path

    minilm = minilm_path()
    (lab / "models").mkdir()
    (lab / "models" / "all-MiniLM-L6-v2").symlink_to(minilm, target_is_directory=True)
    bert = lab / "models" / "bert-base-uncased"
    bert.mkdir()
    for f in minilm.iterdir():
        if f.name != "config.json":
            (bert / f.name).symlink_to(f)
    config = json.loads((minilm / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))


def _lab_cnn_weights(lab: Path) -> None:
    """The trained ``lab_cnn`` of ``lab_pair.yaml`` (its source's options, the folder's 10 classes)."""
    from mergenet_core.data.base import TaskInfo

    source = yaml.safe_load((lab / "lab_pair.yaml").read_text())["source"]
    with pytest.MonkeyPatch.context() as mp:
        models = _plugin(lab / "lab_models.py", mp)
        net = models.lab_cnn(models.LabCNNOptions(**source["model"]["options"]),
                             TaskInfo("imagenette", "image", 10, in_channels=3, image_size=64))
    torch.save(net.state_dict(), lab / source["init_from"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[Path, Path]:
    """(the lab folder with every recipe, plugin and stand-in; the $MERGENET_DATA folder)."""
    if MISSING:
        pytest.skip(f"the recipes need {', '.join(MISSING)} (pip install 'mergenet[vision,timm,hf,data]')")
    base = tmp_path_factory.mktemp("byo")
    lab, shared = base / "lab", base / "shared-data"
    lab.mkdir()
    for name, text in {**_blocks("yaml", "recipe"), **_blocks("python", "file")}.items():
        (lab / name).write_text(text)
    images = fmnist_image_folder(lab / "data" / "imagenette", train_per_class=40, test_per_class=8)
    shared.mkdir()
    (shared / "imagenet").symlink_to(images, target_is_directory=True)
    _weights(lab / "weights" / "resnet18-imagenet.pt", "torchvision", "resnet18")
    _weights(shared / "weights" / "resnet50-imagenet.pt", "torchvision", "resnet50")
    _weights(lab / "weights" / "resnet50.a1_in1k" / "model.safetensors", "timm", "resnet50")
    _weights(lab / "weights" / "resnet18.a1_in1k" / "model.safetensors", "timm", "resnet18")
    _lab_cnn_weights(lab)
    reviews = lab / "data" / "reviews"
    reviews.mkdir()
    for split, n, off in (("train", 120, 0), ("test", 40, 500)):
        rows = [f'"{t}",{"positive" if i % 3 else "negative"}' for i, t in enumerate(_texts(n, off))]
        (reviews / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    _hf_models(lab)
    _hf_data(lab)
    arrays = lab / "data" / "arrays"
    arrays.mkdir()
    for split, n in (("train", 1200), ("test", 200)):
        x, y = _fmnist(n, split)
        np.save(arrays / f"{split}_x.npy", np.repeat(x[..., None], 3, axis=3))  # [N, H, W, 3]
        np.save(arrays / f"{split}_y.npy", y)
    return lab, shared


def test_the_doc_holds_the_recipes_and_plugins():
    assert set(_blocks("yaml", "recipe")) == RECIPES
    assert set(_blocks("python", "file")) == PLUGINS
    text = DOC.read_text()
    assert "../shared" not in text and not re.search(r"(?<![\w/(])#\d+(?![\w-])", text)  # no internal references


def test_every_recipe_validates(lab):
    lab, shared = lab
    elsewhere = lab.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    files = [lab / name for name in sorted(RECIPES)]
    r = run_cli("validate", *files, cwd=elsewhere, env={"MERGENET_DATA": str(shared)}, timeout=300, check=0)
    for f in files:
        assert f"ok: {f}" in r.stdout, (f, r.stdout[-3000:], r.stderr[-3000:])
    mergenet = [f for f in files if "name: mergenet" in f.read_text()]
    assert all(f"note: {f}: method.options.adapter: 1 adapter(s)" in r.stdout for f in mergenet), r.stdout


def test_the_task_defaults_the_doc_states(lab):
    """Each Hugging Face model tokenises with its own tokenizer; a torchvision model started from
    a weights file normalises with its released weights' mean and std, one from scratch measures."""
    from orchestrator.config import load_config

    lab, _ = lab
    cfg = load_config(lab / "bert_minilm.yaml")
    assert cfg.source.task.options["tokenizer"] == str((lab / "models" / "bert-base-uncased").resolve())
    assert cfg.target.task.options["tokenizer"] == str((lab / "models" / "all-MiniLM-L6-v2").resolve())
    cfg = load_config(lab / "r18_mbv2.yaml")
    assert (cfg.source.task.options["mean"], cfg.source.task.options["std"]) == ([0.485, 0.456, 0.406],
                                                                                 [0.229, 0.224, 0.225])
    assert cfg.target.task.options.get("mean") is None and cfg.target.task.options.get("std") is None


def test_the_plugins_run(lab, monkeypatch):
    """The doc's plugin code itself: the model's forward pass; the task's loader gives the splits its
    probe announces, images as uint8 [N, C, H, W] with per-channel statistics."""
    from mergenet_core.data.base import TaskInfo

    lab, _ = lab
    models = _plugin(lab / "lab_models.py", monkeypatch)
    info = TaskInfo("imagenette", "image", 10, in_channels=3, image_size=64)
    net = models.lab_cnn(models.LabCNNOptions(width=8, stages=4), info)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10) and net.classifier_name == "head"
    tasks = _plugin(lab / "lab_tasks.py", monkeypatch)
    opts = tasks.NpyImagesOptions(root=str(lab / "data" / "arrays"), val_size=500)
    shape, data = tasks.probe_npy_images(opts), tasks.load_npy_images(opts, seed=0)
    assert (shape.train, shape.val, shape.test) == (len(data.train), len(data.val), len(data.test)) == (700, 500, 200)
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape[1:] == (3, 28, 28)
    assert shape.info.num_classes == data.info.num_classes == 10 and len(data.info.mean) == len(data.info.std) == 3


def test_the_entry_point_snippet_names_the_plugin_group():
    from mergenet_core.plugins import ENTRY_POINT_GROUP

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    (snippet,) = [t for kind, t in FENCE.findall(DOC.read_text()) if kind == "toml"]
    project = tomllib.loads(snippet)["project"]
    assert project["entry-points"][ENTRY_POINT_GROUP] == {"lab": "lab_mergenet.models"}
