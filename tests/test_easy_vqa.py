"""The image+text tasks and models on the real easy-VQA files (small subsets): the three tasks
(VQA, caption retrieval, shape/colour classes), the two-tower ``vqa`` and ``retrieval`` models,
retrieval recall@k, training steps through the one loop, the role option ``train`` (a frozen
body), wrong modality pairings rejected at validation with one line naming the field, and
``mergenet pairs`` on two-tower models."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import TINY_MODELS, model_spec, tiny_pair
from mergenet_core.config import ConfigErrors
from mergenet_core.config.checks import parse_config
from mergenet_core.config.weightless import check_pair_shapes
from mergenet_core.data import build_task, get_modality, probe_task
from mergenet_core.data import easy_vqa as E
from mergenet_core.data.modality import recall_at_k
from mergenet_core.models import build_model

VQA_TASK = {"name": "easy_vqa", "options": {"train_subset": 320, "test_subset": 128, "val_fraction": 0.2}}
CAP_TASK = {"name": "easy_vqa_captions", "options": {"train_subset": 320, "test_subset": 128, "val_fraction": 0.2}}
SHAPES_TASK = {"name": "easy_vqa_shapes", "options": {"train_subset": 320, "test_subset": 128, "val_fraction": 0.2}}


def _folder() -> str:
    return str(E._folder(None))


def test_attributes_read_from_the_pixels_agree_with_every_question():
    """Every one of the 48,248 questions' answers holds of the attributes the captions and the
    shape/colour classes are made of (pixels, with the questions' own facts first)."""
    folder = _folder()
    attrs = E._attributes(folder)
    assert [len(attrs[s]) for s in ("train", "test")] == [4000, 1000]
    wrong = 0
    for split in ("train", "test"):
        for text, answer, i in zip(*E._questions(folder, split)):
            a = attrs[split][i]
            if answer in E.SHAPES or answer in E.COLORS:
                wrong += answer not in (a["shape"], a["color"])
                continue
            word = re.search("|".join((*E.SHAPES, *E.COLORS)), text).group(0)
            present = word in (a["shape"], a["color"])
            negated = " not " in text or text.startswith("is no ")
            wrong += (present != negated) != (answer == "yes")
    assert wrong == 0
    # the pixel rule alone disagrees with the questions' facts on one image (of 5,000)
    px = E.read_attributes(E._images(folder, "train"))
    facts = E.question_facts(*E._questions(folder, "train"))
    assert sum(px[i][k] != v for i, d in facts.items() for k, v in d.items()) <= 1
    assert E.caption(attrs["train"][0]).startswith("a ") and "rectangle" in E.caption(attrs["train"][0])


def test_tasks_load_and_probe_agree():
    for spec, modality, classes in ((VQA_TASK, "image_question", 13), (CAP_TASK, "image_caption", None),
                                    (SHAPES_TASK, "image", 24)):
        td = build_task(spec["name"], spec["options"], seed=0)
        shape = probe_task(spec["name"], spec["options"])
        assert (len(td.train), len(td.val), len(td.test)) == (shape.train, shape.val, shape.test) == (256, 64, 128)
        assert td.info.modality == shape.info.modality == modality
        assert td.info.num_classes == (classes or len(td.class_names)) and td.info.image_size == 64
        assert "rendered shapes" in td.info.description
    vqa = build_task("easy_vqa", VQA_TASK["options"], seed=0)
    x, y = vqa.train.take(torch.arange(4))
    assert x["image"].to("cpu").shape == (4, 3, 64, 64) and x["input_ids"].shape == (4, 16)
    assert vqa.class_names[int(y[0])] in ("yes", "no", *E.SHAPES, *E.COLORS)
    cap = build_task("easy_vqa_captions", CAP_TASK["options"], seed=0)
    assert len(cap.class_names) > 300 and all(c.startswith("a ") for c in cap.class_names)


def test_recall_at_k_counts_every_image_of_a_caption():
    # 4 pairs, captions 0, 0, 1, 2; image 3 is closest to caption 1's text
    txt = torch.eye(4)
    img = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1, 0], [0, 0, 0.9, 0.1]])
    r = recall_at_k(img, txt, torch.tensor([0, 0, 1, 2]), (1, 5))
    # image->text: gallery = captions {0 (pair 0), 1 (pair 2), 2 (pair 3)}; image 3 ranks caption 1 first
    assert r["recall1"] == pytest.approx(3 / 4) and r["recall5"] == 1.0
    # text->image: caption 0 -> image 0 or 1 (both its images), caption 1 -> image 2, caption 2 -> image 3
    assert r["recall1_t2i"] == 1.0
    far = recall_at_k(-img, txt, torch.tensor([0, 0, 1, 2]), (1,))  # every image points away from its caption
    assert far["recall1"] < 0.5 and far["recall1_t2i"] < 0.5


def _pair(target_model, task, source_model=None, source_task=None, method="alone", options=None, **kw):
    cfg = tiny_pair(method, options, source_model=None, target_model=target_model, task=task, **kw)
    if source_model is not None:
        cfg["source"] = {"model": model_spec(source_model), "task": source_task or task}
    return cfg


def _train(cfg: dict, tmp_path):
    from mergenet_core.training.engine import Engine

    cfg = parse_config(cfg)
    assert check_pair_shapes(cfg) == []
    return Engine(cfg, tmp_path, progress=False).run()


def test_vqa_and_retrieval_train_and_evaluate(tmp_path):
    """A few steps of each through the one loop; retrieval reports its recalls, `acc` = recall@1."""
    final = _train(_pair("vqa", VQA_TASK, recipe={"steps_per_epoch": 2}), tmp_path / "vqa")
    assert 0.0 <= final["target/final_test_acc"] <= 1.0
    from mergenet_core.io.outputs import RunOutputs  # noqa: F401  (the run folder's writer)
    import json

    final = _train(_pair("retrieval", CAP_TASK, recipe={"steps_per_epoch": 2}), tmp_path / "ret")
    rec = [json.loads(line) for line in (tmp_path / "ret" / "metrics.jsonl").read_text().splitlines()][-1]
    for k in ("recall1", "recall5", "recall1_t2i", "recall5_t2i"):
        assert 0.0 <= rec[f"target/test_{k}"] <= 1.0
    assert rec["target/test_acc"] == rec["target/test_recall1"] <= rec["target/test_recall5"]
    from orchestrator.config import parse_config as parse_pair
    from orchestrator.grid.load import reported_metrics

    assert "target/val_recall5" in reported_metrics(parse_pair(_pair("retrieval", CAP_TASK)))[0]


def test_retrieval_loss_is_symmetric_and_match_aware():
    mod = get_modality("image_caption")
    logits = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])

    def grad(y):
        lg = logits.clone().requires_grad_(True)
        mod.loss(lg, torch.tensor(y)).backward()
        return lg.grad

    # pairs 0 and 1 share a caption: image 0 scoring caption 1 as high as its own is not pushed down
    assert abs(float(grad([0, 0, 1])[0, 1])) < 1e-3 < float(grad([0, 1, 2])[0, 1])
    g = grad([0, 1, 2])
    assert torch.allclose(g, g.t())  # image->text and text->image count alike
    assert mod.hits(logits, torch.tensor([0, 0, 1])) == 3


def _problem(cfg: dict) -> str:
    try:
        parsed = parse_config(cfg)
    except ConfigErrors as e:
        assert len(e.lines) == 1, e.lines
        return e.lines[0]
    lines = check_pair_shapes(parsed)
    assert len(lines) == 1, lines
    return lines[0]


def test_wrong_modality_pairings_are_rejected_naming_the_field():
    assert _problem(_pair("cnn", VQA_TASK)) == (
        "target.model.name: model 'cnn' takes image input but task 'easy_vqa' is image_question")
    assert _problem(_pair("retrieval", VQA_TASK)).startswith(
        "target.model.name: model 'retrieval' takes image_caption input but task 'easy_vqa' is image_question")
    assert _problem(_pair("vqa", SHAPES_TASK)).startswith("target.model.name: model 'vqa' takes image_question")
    bad_tower = {"name": "vqa", "options": {**TINY_MODELS["vqa"], "image": {"name": "minilm_l3"}}}
    assert _problem(_pair(bad_tower, VQA_TASK)) == (
        "target.model.options.image.name: the image tower must be an image model, but 'minilm_l3' takes text input")
    bad_opt = {"name": "vqa", "options": {**TINY_MODELS["vqa"], "text": {"name": "minilm_l3", "options": {"depth": 1}}}}
    assert _problem(_pair(bad_opt, VQA_TASK)).startswith("target.model.options.text.options.depth:")
    # a tower's layer named without its tower's prefix (`image.`): the layer pair's field
    mn = {"layer_pairs": [{"source": "bert.encoder.layer.0.attention.output.dense.weight",
                           "target": "features.1.conv.weight", "mode": "svd", "rank": 2}], "freeze_source": True}
    line = _problem(_pair("vqa", VQA_TASK, "minilm_l3", {"name": "rotten_tomatoes",
                                                          "options": {"train_subset": 320, "test_subset": 64}},
                          method="mergenet", options=mn))
    assert line.startswith("method.options.layer_pairs.0.target"), line


def test_train_option_freezes_the_body_and_is_validated(tmp_path):
    """`target.train`: only the named parameters train; a name matching nothing, and a written
    layer left frozen, are one line each naming the field."""
    cfg = _pair("cnn", SHAPES_TASK, target={"train": ["classifier"]}, recipe={"steps_per_epoch": 2})
    from mergenet_core.training.loop import PairState
    from mergenet_core.training.step import take_step

    pair = PairState.build(parse_config(cfg))
    model = pair.roles["target"].model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_step(pair, 0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert _problem(_pair("cnn", SHAPES_TASK, target={"train": ["classifier", "features.9"]})).startswith(
        "target.train.1: 'features.9' names no parameter of the target model")
    mn = {"layer_pairs": [{"source": "features.1.conv.weight", "target": "features.1.conv.weight", "mode": "svd",
                           "rank": 2}], "freeze_source": True, "adapter": {"layers": 1, "heads": 2}}
    frozen = _pair("cnn", SHAPES_TASK, "cnn", method="mergenet", options=mn, target={"train": ["classifier"]})
    assert _problem(frozen).startswith("target.train: 'features.1.conv.weight' is written by layer_pairs.0")
    frozen["target"]["train"] = ["classifier", "features.1.conv.weight"]
    assert check_pair_shapes(parse_config(frozen)) == []


def test_pairs_rank_two_tower_layers_within_their_modality():
    from mergenet_core.models.inspect import suggest_pairs

    info = get_modality("image_question").example_info(13)
    vqa = build_model("vqa", TINY_MODELS["vqa"], info)
    ret = build_model("retrieval", TINY_MODELS["retrieval"], get_modality("image_caption").example_info(0))
    cnn = build_model("cnn", TINY_MODELS["cnn"], get_modality("image").example_info(24))
    l3 = build_model("minilm_l3", {"pretrained": False, "num_layers": 1}, get_modality("text").example_info(2))
    for src, tgt, prefix in ((cnn, vqa, "image."), (l3, vqa, "text.")):
        pairs = [(s, t) for s, t, _ in suggest_pairs(src, tgt) if not t.startswith("classifier")]
        assert pairs and all(t.startswith(prefix) for _, t in pairs), pairs
    pairs = suggest_pairs(vqa, ret)
    assert pairs and all(s.split(".")[0] == t.split(".")[0] for s, t, _ in pairs), pairs


def test_reports_name_recall_where_acc_is_recall():
    """A retrieval target's `acc` is image->text recall@1: the report and the summary say so."""
    from orchestrator.grid.load import load_grid
    from orchestrator.tracking.records import score_name

    study = Path(__file__).resolve().parents[1] / "experiments" / "study"
    assert score_name(load_grid(study / "e_vqa_retrieval.yaml", deep=False)) == "image→text recall@1"
    assert score_name(load_grid(study / "e_cross_modal_image.yaml", deep=False)) == "accuracy"
    assert score_name(None) == "accuracy"
