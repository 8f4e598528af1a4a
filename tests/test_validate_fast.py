"""Fast validation (``mergenet validate``; issue #12 item 6) against the full build
(``mergenet validate --deep``): the same first error line for a table of bad configs, the same
warnings for good ones, weightless models equal to the real ones, task metadata equal to the
loaded tasks, and no Ray or MLflow import. Real data and real models throughout; no timing
assertions (speed: benchmarks/bench_validate.py)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY_TASK, cli_env, mergenet_options, tiny_grid, tiny_pair, write_yaml
from orchestrator.config import parse_config
from orchestrator.grid.load import check_layers

TEXT = {"name": "rotten_tomatoes", "options": {"max_length": 16, "train_subset": 64, "test_subset": 32}}
L3 = {"name": "minilm_l3", "options": {"num_layers": 1}}
ATT = "bert.encoder.layer.0.attention.output.dense.weight"


def _cnn_state(tmp_path: Path, channels=(8, 16), name="other.pt") -> Path:
    """A real state_dict of a tiny CNN (other widths: a shape mismatch)."""
    from mergenet_core.models.cnn import SmallCNN

    path = tmp_path / name
    torch.save(SmallCNN(10, 1, list(channels), 32).state_dict(), path)
    return path


def _bundle_without_target(tmp_path: Path) -> Path:
    from mergenet_core.models.cnn import SmallCNN

    path = tmp_path / "pair.pt"
    torch.save({"roles": {"a": {"model": SmallCNN(10, 1, [8, 16], 32).state_dict()},
                          "b": {"model": SmallCNN(10, 1, [8, 16], 32).state_dict()}}}, path)
    return path


def _factorised_state(tmp_path: Path) -> Path:
    """The state_dict of a tiny CNN whose classifier a mergenet 'learned' pair factorised (A, B)."""
    from mergenet_core.lowrank import make_encoding
    from mergenet_core.models.cnn import SmallCNN

    model = SmallCNN(10, 1, [8, 16], 32)
    make_encoding(model, "classifier.weight", "learned", 2)
    path = tmp_path / "factorised.pt"
    torch.save(model.state_dict(), path)
    return path


def _svd(**extra):
    opts = mergenet_options(**extra)
    opts["layer_pairs"][0]["mode"] = "svd"
    return opts


# (case id, function tmp_path -> pair config dict); every config parses, and the full build refuses it
BAD = [
    ("unknown-source-layer", lambda t: tiny_pair("mergenet", mergenet_options(source="nope.weight"))),
    ("unknown-target-layer", lambda t: tiny_pair("mergenet", mergenet_options(target="features.9.conv.weight"))),
    ("rank-too-big", lambda t: tiny_pair("mergenet", mergenet_options(rank=11))),
    ("rank-too-big-svd", lambda t: tiny_pair("mergenet", _svd(source="features.1.conv.weight",
                                                              target="features.1.conv.weight", rank=17))),
    ("vector-not-matrix", lambda t: tiny_pair("mergenet", mergenet_options(target="features.0.bn.weight"))),
    ("adapter-heads", lambda t: tiny_pair("mergenet", mergenet_options(adapter={"heads": 1000}))),
    ("adapter-anchor-unequal", lambda t: tiny_pair("mergenet", mergenet_options(
        source="hidden.weight", adapter={"anchor": "source"}))),
    # the adapter refuses the anchor before building its attentions: that error comes first
    ("adapter-anchor-before-heads", lambda t: tiny_pair("mergenet", mergenet_options(
        source="hidden.weight", adapter={"anchor": "source", "heads": 1000}))),
    ("frozen-learned-source-rank", lambda t: tiny_pair("mergenet", mergenet_options(rank=40, freeze_source=True,
                                                                                    target="hidden.weight",
                                                                                    source="hidden.weight"))),
    ("transplant-incompatible-layer", lambda t: tiny_pair("transplant", {"layers": ["features.1.conv.weight"]},
                                                          source_model={"name": "cnn", "options": {
                                                              "channels": [8, 8], "hidden": 32}})),
    ("param-share-unknown-layer", lambda t: tiny_pair("param_share", {"layer_pairs": [
        {"source": "classifier.weight", "target": "classifier.bias"}]})),
    ("missing-data", lambda t: tiny_pair(target={"task": {"options": {"root": str(t / "nowhere")}}})),
    ("missing-source-data", lambda t: tiny_pair("kd", source={"task": {"options": {"root": str(t / "none")}}},
                                                target={"task": {"options": {"root": str(t / "none")}}})),
    ("val-size-too-big", lambda t: tiny_pair(target={"task": {"options": {"train_subset": 59_950,
                                                                          "val_size": 100}}})),
    ("batch-larger-than-split", lambda t: tiny_pair("mergenet", mergenet_options(), recipe={"batch_size": 300})),
    ("init-from-missing", lambda t: tiny_pair(target={"init_from": str(t / "missing.pt")})),
    ("init-from-other-shapes", lambda t: tiny_pair(target={"init_from": str(_cnn_state(t, (8, 24)))})),
    ("init-from-not-a-checkpoint", lambda t: tiny_pair(target={"init_from": str(write_yaml(t / "x.pt", "hello"))})),
    ("init-from-factorised", lambda t: tiny_pair(target={"init_from": str(_factorised_state(t))})),
    ("self-transfer-unknown-layer", lambda t: tiny_pair("mergenet", mergenet_options(
        source="hidden.weight", target="nope.weight", self_transfer=True), source_model=None)),
    ("init-from-bundle-without-role", lambda t: tiny_pair(target={"init_from": str(_bundle_without_target(t))})),
    ("ray-workers-co-located", lambda t: tiny_pair("kd", ray={"target_workers": 2})),
    ("text-learned-embedding", lambda t: tiny_pair("mergenet", mergenet_options(
        source=ATT, target="bert.embeddings.word_embeddings.weight"), source_model=L3, target_model=L3, task=TEXT)),
    ("text-too-many-layers", lambda t: tiny_pair(target_model={"name": "minilm_l3", "options": {"num_layers": 5}},
                                                 source_model=None, task=TEXT)),
]

GOOD = [
    ("mergenet-classifier-warns", lambda t: tiny_pair("mergenet", mergenet_options())),
    ("mergenet-normalised", lambda t: tiny_pair("mergenet", mergenet_options(source="features.1.conv.weight",
                                                                             target="features.1.conv.weight"))),
    ("mergenet-both-directions", lambda t: tiny_pair("mergenet", mergenet_options(source="fc.weight", direction="both"),
                                                     source_model="resnet18", target_model="mobilenetv2")),
    ("self-transfer", lambda t: tiny_pair("mergenet", _svd(
        source="hidden.weight", target="features.1.conv.weight", self_transfer=True), source_model=None)),
    ("param-share", lambda t: tiny_pair("param_share", {"layer_pairs": [
        {"source": "hidden.weight", "target": "classifier.weight"}]})),
    ("transplant-weight-selection", lambda t: tiny_pair("transplant", {}, source_model={"name": "cnn", "options": {
        "channels": [16, 32], "hidden": 64}})),
    ("kd-init-from", lambda t: tiny_pair("kd", source={"init_from": str(_cnn_state(t))})),
    ("untrained-control-ignores-init-from", lambda t: tiny_pair(
        "mergenet", mergenet_options(control="untrained_source"),
        source={"init_from": str(t / "missing.pt")})),
    ("text-svd", lambda t: tiny_pair("mergenet", _svd(source=ATT, target=ATT), source_model=L3, target_model=L3,
                                     task=TEXT)),
    ("unscaled-svd-warns", lambda t: tiny_pair("mergenet", mergenet_options(layer_pairs=[
        {"source": "features.1.conv.weight", "target": "features.1.conv.weight", "mode": "svd", "rank": 2,
         "output_scale": "none"}]))),
]


def test_unscaled_writes_in_svd_and_learned_mode_are_warned_about(tmp_path):
    """output_scale none writes the adapter's LayerNorm output (row norm ~ sqrt(columns)) into the
    layer: `mergenet validate` warns, naming the field; full mode into a normalised layer does not."""
    for mode, warned in (("svd", True), ("learned", True), ("full", False)):
        lp = {"source": "features.1.conv.weight", "target": "features.1.conv.weight", "mode": mode, "rank": 2,
              "output_scale": "none"}
        (fast, fast_w), _ = _both(tiny_pair("mergenet", mergenet_options(layer_pairs=[lp])))
        assert fast == []
        hit = [w for w in fast_w if w.startswith("method.options.layer_pairs.0.output_scale: 'none'")]
        assert bool(hit) == warned, (mode, fast_w)


def _both(cfg_dict: dict) -> tuple[tuple[list, list], tuple[list, list]]:
    cfg = parse_config(cfg_dict)
    fast_w: list[str] = []
    deep_w: list[str] = []
    fast = check_layers(cfg, fast_w, build=False)
    deep = check_layers(cfg, deep_w, build=True)
    return (fast, fast_w), (deep, deep_w)


@pytest.mark.parametrize("case,make", BAD, ids=[c[0] for c in BAD])
def test_fast_and_deep_report_the_same_error(tmp_path, case, make):
    (fast, _), (deep, _) = _both(make(tmp_path))
    assert deep, "the full build accepts this config: not a bad case"
    assert fast == deep


@pytest.mark.parametrize("case,make", GOOD, ids=[c[0] for c in GOOD])
def test_fast_and_deep_accept_with_the_same_warnings(tmp_path, case, make):
    (fast, fast_w), (deep, deep_w) = _both(make(tmp_path))
    assert fast == deep == []
    assert fast_w == deep_w


def test_grid_fast_and_deep_agree_through_the_cli(tmp_path, capsys):
    from orchestrator.cli import main

    grid = tiny_grid("g", task=TINY_TASK, epochs=1, steps_per_epoch=1, target_model={"name": "cnn", "options":
                     {"channels": [8, 16], "hidden": 32}}, methods={"alone": {}, "mergenet": {"t_cycle": 1}},
                     seeds=[0], search={"method.options.adapter.heads": {"grid": [2, 1000]}})
    grid["pairs"][0]["layer_pairs"] = [{"source": "classifier.weight", "target": "hidden.weight", "rank": 2},
                                       {"source": "hidden.weight", "target": "features.1.bn.weight", "rank": 2}]
    path = write_yaml(tmp_path / "g.yaml", grid)
    results = []
    for extra in ([], ["--deep"]):
        rc = main(["validate", str(path), *extra])
        results.append((rc, capsys.readouterr().err))
    assert results[0] == results[1]
    assert results[0][0] == 2 and "layer_pairs.1.target" in results[0][1]


def test_weightless_models_equal_the_real_ones():
    """Names, shapes, buffers, module types and normalisation marks of every model (MiniLM:
    the plain-torch skeleton against transformers' BertModel)."""
    from mergenet_core.data.base import TaskInfo
    from mergenet_core.models import build_model, build_model_shapes
    from mergenet_core.models.inspect import describe

    image = TaskInfo(name="i", modality="image", num_classes=10, in_channels=3, image_size=32)
    text = TaskInfo(name="t", modality="text", num_classes=5, max_length=32, vocab_size=30522)
    cases = [("cnn", {}, image), ("resnet18", {"width": 8}, image), ("resnet50", {"width": 8}, image),
             ("mobilenetv2", {"width_mult": 0.35}, image), ("minilm_l3", {}, text),
             ("minilm_l6", {"num_layers": 2}, text), ("minilm_l6", {"pretrained": False, "num_layers": 2}, text),
             ("minilm_l3", {"pretrained": False, "num_layers": 4, "freeze_encoder": True}, text)]
    for name, opts, info in cases:
        real, light = build_model(name, opts, info), build_model_shapes(name, opts, info)
        assert all(p.device.type == "meta" for p in light.parameters())
        assert [(k, v.shape) for k, v in real.state_dict().items()] == \
               [(k, v.shape) for k, v in light.state_dict().items()], name
        assert [n for n, _ in real.named_buffers()] == [n for n, _ in light.named_buffers()], name
        leaves = [[(n, type(m).__name__) for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
                  for model in (real, light)]
        assert leaves[0] == leaves[1], name
        assert describe(real) == describe(light), name
        assert [p.requires_grad for p in real.parameters()] == [p.requires_grad for p in light.parameters()]


@pytest.mark.parametrize("name,options", [
    ("fashion_mnist", {"image_size": 32, "channels": 3, "train_subset": 2000, "test_subset": 1000}),
    ("fashion_mnist", {"train_subset": 500, "val_size": 300}),
    ("rotten_tomatoes", {"max_length": 32, "train_subset": 2000}),
    ("bbc_news", {"max_length": 32, "train_subset": 50, "val_size": 100}),
])
def test_task_probe_matches_the_loaded_task(name, options):
    from mergenet_core.data import build_task, probe_task

    probe, task = probe_task(name, options), build_task(name, options, seed=0)
    assert (probe.train, probe.val, probe.test) == (len(task.train), len(task.val), len(task.test))
    assert probe.info == dataclasses.replace(task.info, mean=(), std=(), description="")


def test_fast_validate_imports_no_ray_mlflow_or_transformers(tmp_path):
    pair = write_yaml(tmp_path / "pair.yaml", tiny_pair("mergenet", _svd(source=ATT, target=ATT), source_model=L3,
                                                        target_model=L3, task=TEXT))
    grid = ROOT / "experiments" / "quickstart.yaml"
    # nor torch._dynamo: torch imports it for an optimiser or the first arithmetic on meta tensors
    # (seconds); the weightless build must compute nothing on them
    code = ("import sys; from orchestrator.cli import main; rc = main(['validate', sys.argv[1], sys.argv[2]]); "
            "print(rc, sorted(m for m in ('ray', 'mlflow', 'transformers', 'torch._dynamo') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(pair), str(grid)], capture_output=True, text=True,
                          cwd=ROOT, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr[-2000:]


def test_data_pickle_scan_refuses_what_the_loader_refuses(tmp_path):
    import pickle

    import numpy as np

    from mergenet_core.errors import DataMissingError
    from mergenet_core.io.safe_pickle import load_data_pickle, scan_data_pickle

    class Boom:
        def __reduce__(self):
            return os.system, ("true",)

    for proto in (2, 4, 5):
        ok = tmp_path / f"ok{proto}"
        ok.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, protocol=proto))
        scan_data_pickle(ok)
        load_data_pickle(ok)
        bad = tmp_path / f"bad{proto}"
        bad.write_bytes(pickle.dumps({b"data": Boom()}, protocol=proto))
        with pytest.raises(DataMissingError) as fast:
            scan_data_pickle(bad)
        with pytest.raises(DataMissingError) as full:
            load_data_pickle(bad)
        assert str(fast.value) == str(full.value) and "posix.system" in str(fast.value)
        cut = tmp_path / f"cut{proto}"
        cut.write_bytes(ok.read_bytes()[:40])
        with pytest.raises(DataMissingError, match="not a readable data pickle"):
            scan_data_pickle(cut)
