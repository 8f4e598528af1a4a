"""Bring-your-own models (models/vision.py, models/hf.py): torchvision and timm image models, a
local Transformers folder as a text model; weights files with the shape-mismatch rule, option
errors, weightless builds, layer-pair suggestions, two-tower use. Real libraries and files
throughout (the MiniLM-L6 folder of the data extra stands for a user's Transformers model)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from mergenet_core.data import get_modality
from mergenet_core.data.base import TaskInfo
from mergenet_core.data.text import minilm_path
from mergenet_core.errors import ConfigError, DataMissingError
from mergenet_core.models import MODELS, build_model, build_model_shapes
from mergenet_core.models.inspect import describe, suggest_pairs
from mergenet_core.models.vision import import_torchvision

RGB = TaskInfo("c10", "image", 10, in_channels=3, image_size=32)
GREY = TaskInfo("fmnist", "image", 10, in_channels=1, image_size=28)
IMAGENET = TaskInfo("imagenet", "image", 1000, in_channels=3, image_size=32)
TEXT = TaskInfo("bbc_news", "text", 5, max_length=16, vocab_size=30522)
MOBILE = {"name": "mobilenet_v2", "kwargs": {"width_mult": 0.35}}
ATT = "bert.encoder.layer.0.attention.output.dense.weight"


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def minilm() -> str:
    return str(minilm_path())


@pytest.fixture(scope="module")
def batch(minilm) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm, local_files_only=True)
    return dict(tok(["a short text", "a somewhat longer piece of text about the markets today"],
                    padding="max_length", truncation=True, max_length=16, return_tensors="pt"))


def test_entries_registered():
    for name, modality in (("torchvision", "image"), ("timm", "image"), ("hf", "text")):
        assert MODELS.get(name).meta["modality"] == modality
    assert MODELS.get("hf").meta["task_defaults"]({"path": "/some/model"}) == {"tokenizer": "/some/model"}
    assert MODELS.get("hf").meta["task_defaults"]({"name": "org/not-cached"}) == {}  # the model's build says why


@pytest.mark.parametrize("opts, head", [({"name": "resnet18"}, "fc"), (MOBILE, "classifier.1")],
                         ids=["resnet18", "mobilenet_v2"])
def test_torchvision_forward_backward(opts, head):
    torch.manual_seed(0)
    model = build_model("torchvision", opts, RGB)
    assert model.classifier_name == head and model.skipped_weights == []
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert {p.name: p.role for p in describe(model)}[f"{head}.weight"] == "classifier"


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_torchvision_weights_file(tmp_path, fmt):
    """ImageNet-style (1000-class) weights into a 10-class model: the classifier keeps its fresh
    init, every other tensor is the file's; ``pretrained: false`` ignores the file."""
    torch.manual_seed(1)
    state = build_model("torchvision", {"name": "resnet18"}, IMAGENET).state_dict()
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = build_model("torchvision", {"name": "resnet18", "weights": str(path)}, RGB)
    assert model.skipped_weights == ["fc.weight", "fc.bias"]
    assert model.fc.weight.shape == (10, 512)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    weightless = build_model_shapes("torchvision", {"name": "resnet18", "weights": str(path)}, RGB)
    assert weightless.skipped_weights == model.skipped_weights
    untrained = build_model("torchvision", {"name": "resnet18", "weights": str(path), "pretrained": False}, RGB)
    assert untrained.skipped_weights == [] and not torch.equal(untrained.conv1.weight, state["conv1.weight"])


def test_weights_file_errors(tmp_path):
    def error(weights, **extra):
        with pytest.raises(ConfigError) as e:
            build_model("torchvision", {"name": "resnet18", "weights": str(weights), **extra}, RGB)
        assert e.value.field == "model.options.weights"
        return str(e.value)

    assert "no such file" in error(tmp_path / "missing.pt")
    other = tmp_path / "mobilenet.pt"
    torch.save(build_model("torchvision", MOBILE, RGB).state_dict(), other)
    assert "not in the model" in error(other) and "different architecture" in error(other)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in build_model("torchvision", {"name": "resnet18"}, RGB).state_dict().items()
                if not k.startswith("layer4.")}, partial)
    assert "missing from the file" in error(partial)
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, junk)
    assert "not a state_dict of tensors" in error(junk)
    junk.write_bytes(b"not a torch file")
    assert "not a readable weights file" in error(junk)


def test_torchvision_option_errors():
    with pytest.raises(ConfigError) as e:
        build_model("torchvision", {"name": "resnet81"}, RGB)
    assert e.value.field == "model.options.name" and "resnet18" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_model_shapes("torchvision", {"name": "fasterrcnn_resnet50_fpn"}, RGB)  # detection: not offered
    assert e.value.field == "model.options.name"
    with pytest.raises(ConfigError) as e:
        build_model("torchvision", {"name": "resnet18"}, GREY)
    assert e.value.field == "model.name" and "channels: 3" in str(e.value)
    cases = [({"name": "resnet18", "depth": 3}, "model.options.depth"),
             ({}, "model.options.name"),
             ({"name": "resnet18", "kwargs": {"weights": "DEFAULT"}}, "model.options.kwargs.weights"),
             ({"name": "resnet18", "kwargs": {"num_classes": 3}}, "model.options.kwargs.num_classes"),
             ({"name": "resnet18", "kwargs": {"depth": 3}}, "model.options.kwargs")]
    for opts, field in cases:
        with pytest.raises(ConfigError) as e:
            build_model_shapes("torchvision", opts, RGB)
        assert e.value.field == field, opts


def test_weightless_builds_match():
    """The meta-device build has the full build's names and shapes; a builder computing its widths
    with tensors (RegNet) is built too; each entry builds on its modality's stand-in task."""
    for opts in ({"name": "resnet18"}, MOBILE):
        meta = build_model_shapes("torchvision", opts, RGB)
        assert all(t.device.type == "meta" for t in meta.state_dict().values())
        assert shapes(meta) == shapes(build_model("torchvision", opts, RGB))
        assert meta.classifier_name == build_model("torchvision", opts, RGB).classifier_name
    regnet = build_model_shapes("torchvision", {"name": "regnet_x_400mf"}, RGB)
    assert all(t.device.type == "meta" for t in regnet.state_dict().values())
    stand_in = get_modality("image").example_info(7)
    vit = build_model_shapes("torchvision", {"name": "vit_b_32"}, stand_in)  # image_size from the task
    assert vit.image_size == 32 and vit.heads.head.weight.shape == (7, 768)


def test_suggest_pairs_torchvision():
    r18, mb = build_model("torchvision", {"name": "resnet18"}, RGB), build_model("torchvision", MOBILE, RGB)
    pairs = suggest_pairs(r18, mb, k=5)
    assert len(pairs) == 5
    src, tgt = dict(r18.named_parameters()), dict(mb.named_parameters())
    assert all(src[s].dim() >= 2 and tgt[t].dim() >= 2 for s, t, _ in pairs)
    assert len({s for s, _, _ in pairs}) == 5 and len({t for _, t, _ in pairs}) == 5
    assert pairs[0][0] == "layer4.1.conv2.weight"  # largest conv first
    weightless = (build_model_shapes("torchvision", {"name": "resnet18"}, RGB),
                  build_model_shapes("torchvision", MOBILE, RGB))
    assert suggest_pairs(*weightless, k=5) == pairs  # what `mergenet pairs` computes


@pytest.fixture(scope="module")
def timm():
    import_torchvision(required=False)  # timm imports torchvision
    return pytest.importorskip("timm")


def test_timm(timm, tmp_path):
    torch.manual_seed(0)
    grey = build_model("timm", {"name": "resnet18"}, GREY)  # in_chans from the task
    assert grey(torch.randn(2, 1, 28, 28)).shape == (2, 10) and grey.classifier_name == "fc"
    vit = build_model("timm", {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1}}, RGB)  # img_size: 32
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10) and vit.classifier_name == "head"
    path = tmp_path / "timm_r18.pt"
    state = build_model("timm", {"name": "resnet18"}, IMAGENET).state_dict()
    torch.save({"state_dict": state}, path)
    model = build_model("timm", {"name": "resnet18", "checkpoint": str(path)}, RGB)
    assert model.skipped_weights == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    meta = build_model_shapes("timm", {"name": "resnet18", "checkpoint": str(path)}, RGB)
    assert shapes(meta) == shapes(model) and meta.skipped_weights == model.skipped_weights
    with pytest.raises(ConfigError) as e:
        build_model("timm", {"name": "resnet81"}, RGB)
    assert e.value.field == "model.options.name" and "resnet18" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_model("timm", {"name": "resnet18", "kwargs": {"pretrained": True}}, RGB)
    assert e.value.field == "model.options.kwargs.pretrained"


@pytest.mark.parametrize("head", ["classify", "encoder"])
def test_hf_forward_backward(minilm, batch, head):
    torch.manual_seed(0)
    model = build_model("hf", {"path": minilm, "head": head}, TEXT)
    logits = model(batch)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    params = dict(model.named_parameters())
    prefix = "model." if head == "classify" else ""
    assert params[f"{prefix}{ATT}"].grad is not None
    assert params[f"{model.classifier_name}.weight"].grad is not None
    assert model.skipped_weights == (["model.classifier.bias", "model.classifier.weight"] if head == "classify" else [])
    from safetensors.torch import load_file

    sd = load_file(f"{minilm}/model.safetensors")
    torch.testing.assert_close(params[f"{prefix}{ATT}"], sd[ATT.removeprefix("bert.")])
    meta = build_model_shapes("hf", {"path": minilm, "head": head}, TEXT)
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    assert shapes(meta) == shapes(model) and meta.classifier_name == model.classifier_name


def test_hf_encoder_has_minilm_l6_names(minilm, batch):
    """The encoder head on the MiniLM-L6 folder is the ``minilm_l6`` entry: same names, shapes
    and pretrained values (weights of one start the other); mean pooling ignores padding."""
    enc = build_model("hf", {"path": minilm, "head": "encoder"}, TEXT).eval()
    l6 = build_model("minilm_l6", {}, TEXT)
    assert shapes(enc) == shapes(l6)
    own = l6.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in enc.state_dict().items() if not k.startswith("classifier"))
    n = int(batch["attention_mask"][0].sum())  # the first text's tokens, without its padding
    short = {k: v[:1, :n] for k, v in batch.items()}
    padded = {k: v[:1] for k, v in batch.items()}
    torch.testing.assert_close(enc(short), enc(padded), atol=1e-5, rtol=1e-5)


def test_hf_classifier_of_another_size(minilm, tmp_path):
    """A fine-tuned 2-label checkpoint on a 5-class task: its classifier is re-initialised (and
    recorded), the rest loaded; on a 2-class task nothing is skipped."""
    import_torchvision(required=False)  # transformers' model modules import torchvision where installed
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig.from_pretrained(minilm, num_hidden_layers=1, num_labels=2)
    tuned = BertForSequenceClassification(cfg)
    tuned.save_pretrained(tmp_path / "tuned")
    five = build_model("hf", {"path": str(tmp_path / "tuned")}, TEXT)
    assert five.skipped_weights == ["model.classifier.bias", "model.classifier.weight"]
    assert five.model.classifier.weight.shape == (5, 384)
    torch.testing.assert_close(five.get_parameter(f"model.{ATT}"), tuned.get_parameter(ATT))
    two = build_model("hf", {"path": str(tmp_path / "tuned")}, TaskInfo("t", "text", 2, max_length=16))
    assert two.skipped_weights == [] and torch.equal(two.model.classifier.weight, tuned.classifier.weight)


def test_hf_errors_and_scratch(minilm, tmp_path):
    for opts, field in (({}, "model.options"), ({"path": minilm, "name": "x/y"}, "model.options"),
                        ({"path": str(tmp_path)}, "model.options.path"),
                        ({"name": "nobody/not-cached-model"}, "model.options.name"),
                        ({"path": minilm, "head": "pool"}, "model.options.head")):
        with pytest.raises(ConfigError) as e:
            build_model_shapes("hf", opts, TEXT)
        assert e.value.field == field, opts
    with pytest.raises(ConfigError, match="vocab_size 50000"):
        build_model_shapes("hf", {"path": minilm}, TaskInfo("t", "text", 5, max_length=16, vocab_size=50000))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(f"{minilm}/config.json", config_only)
    for build in (build_model, build_model_shapes):
        with pytest.raises(DataMissingError, match="pretrained: false"):
            build("hf", {"path": str(config_only)}, TEXT)
    cfg = json.loads((config_only / "config.json").read_text())
    scratch = build_model("hf", {"path": str(config_only), "pretrained": False}, TEXT)
    assert len(scratch.model.bert.encoder.layer) == cfg["num_hidden_layers"]


def test_hf_name_from_local_cache(minilm, batch, tmp_path, monkeypatch):
    """``name``: a model id resolved in the local Hugging Face cache (hub layout), offline."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).symlink_to(f"{minilm}/{f}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = build_model("hf", {"name": "acme/tiny-bert", "head": "encoder"}, TEXT)
    assert model(batch).shape == (2, 5)
    # the text task tokenises with the cached snapshot's folder (text tasks take a folder)
    assert MODELS.get("hf").meta["task_defaults"]({"name": "acme/tiny-bert"}) == {"tokenizer": str(snap)}


def test_byo_towers(minilm):
    """A two-tower model with a torchvision image tower and an hf text tower."""
    info = get_modality("image_question").example_info(13)
    opts = {"image": {"name": "torchvision", "options": {"name": "resnet18"}},
            "text": {"name": "hf", "options": {"path": minilm, "head": "encoder"}}, "dim": 32, "hidden": 32}
    vqa = build_model_shapes("vqa", opts, info)
    params = dict(vqa.named_parameters())
    assert params["image_proj.weight"].shape == (32, 512) and params["text_proj.weight"].shape == (32, 384)
    assert f"text.{ATT}" in params and "image.layer4.1.conv2.weight" in params


def test_weightless_first_keeps_real_initialisers(minilm):
    """A weightless build that first imports transformers (fast validation) must not leave its
    initialisers as the no-op :func:`weightless` patches in: a later real build from the config
    alone is initialised as Transformers does (normal, std 0.02), not left at torch's defaults."""
    code = ("from mergenet_core.data.base import TaskInfo\n"
            "from mergenet_core.models import build_model, build_model_shapes\n"
            "info = TaskInfo('t', 'text', 5, max_length=16, vocab_size=30522)\n"
            f"opts = {{'path': {minilm!r}, 'pretrained': False}}\n"
            "build_model_shapes('hf', opts, info)\n"
            "m = build_model('hf', opts, info)\n"
            f"print(float(m.get_parameter('model.{ATT}').std()))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) == pytest.approx(0.02, rel=0.1)


def test_a_weights_file_brings_its_normalisation_unless_the_task_gives_one(tmp_path):
    """Started from a weights file, a torchvision model's image task normalises as torchvision's
    released weights for that builder do (ImageNet statistics); given mean/std win; a model
    trained from scratch keeps the task's own (measured) statistics."""
    from helpers import fmnist_image_folder
    from mergenet_core.models.vision import import_torchvision
    from orchestrator.config import parse_config

    torch.save(import_torchvision().models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pt")
    root = str(fmnist_image_folder(tmp_path / "fm", 4, 2))

    def task_options(model_options: dict, **task: object) -> dict:
        cfg = parse_config({"device": "cpu", "target": {
            "model": {"name": "torchvision", "options": model_options},
            "task": {"name": "image_folder", "options": {"root": root, "image_size": 32, **task}}}})
        return cfg.target.task.options

    weights = {"name": "resnet18", "weights": str(tmp_path / "r18.pt")}
    assert task_options(weights)["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert task_options(weights, mean=[0.5] * 3, std=[0.2] * 3)["mean"] == [0.5] * 3
    assert "mean" not in task_options({"name": "resnet18"})
    assert "mean" not in task_options({**weights, "pretrained": False})
