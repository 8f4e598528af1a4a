"""``transplant`` (the positive control): exact copies, weight selection from a wider source,
what ``parts`` brings along, ``freeze``, the untrained-source control, and the config errors
(fast validation and the full build report the same first line)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny_pair, write_yaml
from mergenet_core.config.checks import parse_config
from mergenet_core.training.loop import PairState
from mergenet_core.methods.transplant import select_uniform
from mergenet_core.models.cnn import SmallCNN
from mergenet_core.training.roles import build_role
from mergenet_core.training.step import take_step


WIDE = {"name": "cnn", "options": {"channels": [16, 32], "hidden": 32}}
NARROW = {"name": "cnn", "options": {"channels": [4, 8], "hidden": 32}}


def _trained_like(tmp_path: Path, channels=(8, 16), name="source.pt") -> tuple[Path, dict]:
    """A saved CNN state whose every entry differs from any fresh initialisation (random
    weights, positive running variances, ``num_batches_tracked`` 7): a stand-in for a trained
    source."""
    g = torch.Generator().manual_seed(123)
    state = SmallCNN(10, 1, list(channels), 32).state_dict()
    for k, v in state.items():
        if v.dtype == torch.long:
            state[k] = torch.full_like(v, 7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g)
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def _pair(tmp_path: Path, options: dict, channels=(8, 16), **kw) -> tuple[PairState, dict]:
    path, state = _trained_like(tmp_path, channels)
    src = {"name": "cnn", "options": {"channels": list(channels), "hidden": 32}}
    cfg = tiny_pair("transplant", options, source_model=src, source={"init_from": str(path)}, **kw)
    return PairState.build(parse_config(cfg)), state


def _alone_target() -> dict:
    """The target as ``alone`` builds it at the same seed (no transplant)."""
    return PairState.build(parse_config(tiny_pair("alone", source_model=None))).roles["target"].model.state_dict()


def _state(pair: PairState, role: str = "target") -> dict:
    return {k: v.detach().clone() for k, v in pair.roles[role].model.state_dict().items()}


def test_a_named_block_is_copied_with_its_norm_statistics(tmp_path):
    pair, src = _pair(tmp_path, {"layers": ["features.1"]})
    tgt, own = _state(pair), _alone_target()
    block = [k for k in tgt if k.startswith("features.1.")]
    assert {k.rpartition(".")[2] for k in block} == {"weight", "bias", "running_mean", "running_var",
                                                     "num_batches_tracked"}
    for k in tgt:
        assert torch.equal(tgt[k], src[k] if k in block else own[k]), k
    assert pair.method.epoch_metrics() == {
        "transplant/entries_copied": len(block), "transplant/entries_selected": 0, "transplant/entries_skipped": 0,
        "transplant/fraction_of_target": pytest.approx(
            sum(p.numel() for n, p in pair.roles["target"].model.named_parameters() if n.startswith("features.1."))
            / sum(p.numel() for p in pair.roles["target"].model.parameters()))}


def test_a_parameter_name_and_a_renamed_layer(tmp_path):
    """``hidden.weight`` alone (its bias stays the target's); the source's ``features.1`` block
    into the target's ``features.0`` (16 x 16 x 3 x 3 -> 8 x 1 x 3 x 3: every other output
    channel, input channel 0)."""
    pair, src = _pair(tmp_path, {"layers": ["hidden.weight", {"source": "features.1", "target": "features.0"}]},
                      channels=(16, 16))
    tgt, own = _state(pair), _alone_target()
    assert torch.equal(tgt["hidden.weight"], src["hidden.weight"])
    assert torch.equal(tgt["features.0.conv.weight"], src["features.1.conv.weight"][::2, :1])
    for p in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(tgt[f"features.0.bn.{p}"], src[f"features.1.bn.{p}"][::2]), p
    moved = {"hidden.weight"} | {k for k in tgt if k.startswith("features.0.")}
    for k in tgt:
        if k not in moved:
            assert torch.equal(tgt[k], own[k]), k
    m = pair.method.epoch_metrics()
    assert (m["transplant/entries_copied"], m["transplant/entries_selected"]) == (2, 5)  # hidden.weight, the counter


def test_layers_all_between_identical_models_copies_the_whole_state(tmp_path):
    pair, src = _pair(tmp_path, {"layers": "all"})
    tgt = _state(pair)
    assert tgt.keys() == src.keys()
    for k in tgt:
        assert torch.equal(tgt[k], src[k]), k
    m = pair.method.epoch_metrics()
    assert m["transplant/entries_copied"] == len(src) and m["transplant/fraction_of_target"] == 1.0


def test_uniform_selection_rule():
    x = torch.arange(5 * 4).reshape(5, 4)
    assert torch.equal(select_uniform(x, (3, 2)), x[[0, 1, 3]][:, [0, 2]])  # floor(i * 5 / 3), floor(i * 4 / 2)
    assert torch.equal(select_uniform(x, (5, 4)), x)


def test_weight_selection_from_a_wider_source(tmp_path):
    pair, src = _pair(tmp_path, {"layers": "all"}, channels=(16, 32))
    tgt = _state(pair)
    assert torch.equal(tgt["features.0.conv.weight"], src["features.0.conv.weight"][::2])  # 8 x 1 <- 16 x 1
    assert torch.equal(tgt["features.1.conv.weight"], src["features.1.conv.weight"][::2, ::2])  # 16 x 8 <- 32 x 16
    for i in (0, 1):
        for p in ("weight", "bias", "running_mean", "running_var"):
            k = f"features.{i}.bn.{p}"
            assert torch.equal(tgt[k], src[k][::2]), k
        assert tgt[f"features.{i}.bn.num_batches_tracked"] == 7
    assert torch.equal(tgt["hidden.weight"], src["hidden.weight"][:, ::2])  # 32 x 16 <- 32 x 32
    for k in ("hidden.bias", "classifier.weight", "classifier.bias"):
        assert torch.equal(tgt[k], src[k]), k
    m = pair.method.epoch_metrics()
    assert (m["transplant/entries_copied"], m["transplant/entries_selected"], m["transplant/entries_skipped"]) == \
           (5, 11, 0)  # two num_batches_tracked, hidden.bias and the classifier are copied
    assert m["transplant/fraction_of_target"] == 1.0


def test_layers_all_skips_and_counts_incompatible_entries(tmp_path):
    """A narrower source: only the entries no wider than the source's (the classifier, the
    hidden bias, the step counters) come across."""
    pair, src = _pair(tmp_path, {"layers": "all"}, channels=(4, 8))
    tgt, own = _state(pair), _alone_target()
    moved = {"classifier.weight", "classifier.bias", "hidden.bias", "features.0.bn.num_batches_tracked",
             "features.1.bn.num_batches_tracked"}
    for k in tgt:
        assert torch.equal(tgt[k], src[k] if k in moved else own[k]), k
    m = pair.method.epoch_metrics()
    assert (m["transplant/entries_copied"], m["transplant/entries_selected"], m["transplant/entries_skipped"]) == \
           (5, 0, len(tgt) - 5)


def test_parts_weights_keeps_the_targets_biases_and_statistics(tmp_path):
    pair, src = _pair(tmp_path, {"layers": ["features.1", "classifier"], "parts": "weights"})
    tgt, own = _state(pair), _alone_target()
    moved = {"features.1.conv.weight", "classifier.weight"}
    for k in tgt:
        assert torch.equal(tgt[k], src[k] if k in moved else own[k]), k
    pair, src = _pair(tmp_path, {"layers": "all", "parts": "weights"})  # every conv/linear weight, nothing else
    tgt = _state(pair)
    for k in tgt:
        is_weight = k.endswith("conv.weight") or k in ("hidden.weight", "classifier.weight")
        assert torch.equal(tgt[k], src[k] if is_weight else own[k]), k
    assert pair.method.epoch_metrics()["transplant/entries_copied"] == 4


def test_freeze_keeps_the_copied_parameters(tmp_path):
    pair, src = _pair(tmp_path, {"layers": ["features.1"], "freeze": True})
    before = _state(pair)
    model = pair.roles["target"].model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"features.1.conv.weight", "features.1.bn.weight", "features.1.bn.bias"}
    in_optimiser = {id(p) for g in pair.roles["target"].optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimiser for n, p in model.named_parameters() if n in frozen)
    for step in range(3):
        take_step(pair, step)
    after = _state(pair)
    for k in frozen:
        assert torch.equal(after[k], src[k]), k
    assert not torch.equal(after["features.0.conv.weight"], before["features.0.conv.weight"])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    # running statistics are buffers: they keep BatchNorm's ordinary training-mode update
    assert not torch.equal(after["features.1.bn.running_mean"], src["features.1.bn.running_mean"])


def test_the_target_steps_exactly_like_alone(tmp_path):
    """After the copy the target takes ``alone``'s steps: same batches, same RNG, same updates."""
    pair, _ = _pair(tmp_path, {"layers": ["features.1"]})
    alone = PairState.build(parse_config(tiny_pair("alone", source_model=None)))
    alone.roles["target"].model.load_state_dict(pair.roles["target"].model.state_dict())
    src_before = _state(pair, "source")
    for step in range(3):
        take_step(pair, step)
        take_step(alone, step)
    a, b = _state(pair), _state(alone)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(torch.equal(v, src_before[k]) for k, v in _state(pair, "source").items())  # the donor never trains
    assert pair.method.roles(pair.method.options).trained == ("target",) and not pair.roles["source"].trainable


def test_untrained_source_control_copies_the_seeds_initialisation(tmp_path):
    trained, src = _pair(tmp_path, {"layers": ["features.1"]})
    control, _ = _pair(tmp_path, {"layers": ["features.1"], "control": "untrained_source"})
    cfg = control.cfg
    fresh = build_role("source", cfg, load_init=False).model.state_dict()
    a, b = _state(control), _state(trained)
    block = [k for k in a if k.startswith("features.1.")]
    for k in block:
        assert torch.equal(a[k], fresh[k]), k
        assert torch.equal(b[k], src[k]), k
    for k in ("features.1.conv.weight", "features.1.bn.running_var"):
        assert not torch.equal(a[k], b[k]), k
    assert "source/val_acc" not in control.evaluate()


# ---------------------------------------------------------------------------- errors
def _bad(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """case -> (config, the error line's start)"""
    narrow, _ = _trained_like(tmp_path, (4, 8), "narrow.pt")
    return {
        "unknown-layer": (tiny_pair("transplant", {"layers": ["features.9"]}),
                          "method.options.layers.0: 'features.9' names no parameter or module of the target"),
        "unknown-source-layer": (tiny_pair("transplant", {"layers": [{"source": "nope", "target": "features.1"}]}),
                                 "method.options.layers.0.source: 'nope' names no parameter or module of the source"),
        "target-wider": (tiny_pair("transplant", {"layers": ["features.1"]}, source_model=NARROW,
                                   source={"init_from": str(narrow)}),
                         "method.options.layers.0: target 'features.1.conv.weight' is (16, 8, 3, 3) but source "
                         "'features.1.conv.weight' is (8, 4, 3, 3): the target has a larger dim"),
        "target-wider-second": (tiny_pair("transplant", {"layers": ["classifier", "features.1"]},
                                          source_model=NARROW, source={"init_from": str(narrow)}),
                                "method.options.layers.1: target 'features.1.conv.weight' is (16, 8, 3, 3) but source "
                         "'features.1.conv.weight' is (8, 4, 3, 3)"),
        "renamed-other-ndim": (tiny_pair("transplant", {"layers": [{"source": "classifier.bias",
                                                                     "target": "classifier.weight"}]}),
                               "method.options.layers.0: target 'classifier.weight' is (10, 32) but source "
                               "'classifier.bias' is (10,): the target has more dims"),
        "nothing-compatible": (tiny_pair("transplant", {"layers": "all"}, source_model="resnet18"),
                               "method.options.layers: no target entry has a same-named source entry"),
        "weights-of-a-norm": (tiny_pair("transplant", {"layers": ["features.1.bn"], "parts": "weights"}),
                              "method.options.layers.0: target 'features.1.bn' holds no conv/linear weight"),
        "twice": (tiny_pair("transplant", {"layers": ["features.1", "features.1.conv.weight"]}),
                  "method.options.layers.1: target 'features.1.conv.weight' is already transplanted by "
                  "method.options.layers.0"),
        "freeze-everything": (tiny_pair("transplant", {"layers": "all", "freeze": True}),
                              "method.options.freeze: every trainable target parameter is transplanted"),
    }


@pytest.mark.parametrize("case", ["unknown-layer", "unknown-source-layer", "target-wider", "target-wider-second",
                                  "renamed-other-ndim",
                                  "nothing-compatible", "weights-of-a-norm", "twice", "freeze-everything"])
def test_validate_fast_and_deep_give_the_same_line(tmp_path, capsys, case):
    from orchestrator.cli import main

    data, start = _bad(tmp_path)[case]
    path = write_yaml(tmp_path / "pair.yaml", data)
    out = []
    for extra in ([], ["--deep"]):
        rc = main(["validate", *extra, str(path)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(err) == 1, (extra, err)
        out.append(err[0])
    assert out[0] == out[1]
    assert out[0].startswith(f"error: {path}: {start}"), out[0]


def test_options_are_strict():
    from pydantic import ValidationError

    from mergenet_core.methods.transplant import TransplantOptions

    for bad in ({"layer": "all"}, {"layers": []}, {"layers": "some"}, {"selection": "random"},
                {"control": "shuffled_source"}, {"layers": [{"source": "a"}]}, {"parts": "bias"}):
        with pytest.raises(ValidationError):
            TransplantOptions.model_validate(bad)
    o = TransplantOptions()
    assert (o.layers, o.parts, o.selection, o.freeze, o.control) == ("all", "block", "uniform", False, "none")


def test_a_source_without_trained_weights_is_a_warning(tmp_path, capsys):
    from orchestrator.cli import main

    path = write_yaml(tmp_path / "pair.yaml", tiny_pair("transplant", {"layers": ["features.1"]}))
    assert main(["validate", str(path)]) == 0
    assert "source.init_from: not set" in capsys.readouterr().err
    trained, _ = _trained_like(tmp_path)
    path = write_yaml(tmp_path / "pair.yaml", tiny_pair("transplant", {"layers": ["features.1"]},
                                                        source={"init_from": str(trained)}))
    assert main(["validate", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_fast_and_deep_warn_alike(tmp_path):
    """A narrower source under ``layers: all``: the skipped entries are a warning, the same
    from the weightless models as from the full build."""
    from orchestrator.config import parse_config as parse_pair
    from orchestrator.grid.load import check_layers

    cfg = parse_pair(tiny_pair("transplant", {"layers": "all"}, source_model=NARROW))
    fast, deep = [], []
    assert check_layers(cfg, fast, build=False) == check_layers(cfg, deep, build=True) == []
    assert fast == deep and len(fast) == 2
    assert fast[1].startswith("method.options.layers: 11 same-named entries")
