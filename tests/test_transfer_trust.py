"""Transfer you can trust: stable svd factors, the authors' exact adapter, starting roles from
trained weights, negative controls and safe layer pairs (all on CPU, real Fashion-MNIST)."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
from helpers import (assert_same_metrics, mergenet_options, read_metrics, tiny_pair,
                     write_yaml)
from mergenet_core.methods.mergenet.adapter import ParameterAdapter, adapter_param_count
from mergenet_core.config import ConfigErrors
from orchestrator.config import load_config, parse_config
from mergenet_core.training.engine import Engine, PairState
from mergenet_core.errors import ConfigError
from mergenet_core.lowrank import (canonical_signs, make_encoding, procrustes_align, row_cosine,
                                   truncated_svd_factors)
from mergenet_core.methods.mergenet import AdapterOptions, MergeNetOptions
from orchestrator.cli import main



# --------------------------------------------------------------------------- stable factors


def _linear(seed=0, out=24, cols=40):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(cols, out))


def test_two_reads_without_training_give_identical_factors():
    m = _linear()
    enc = make_encoding(m, "0.weight", "svd", rank=4)
    a1, (b1, _) = enc.read(), enc.factors
    a2, (b2, _) = enc.read(), enc.factors
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert enc.last_row_cos == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_aligned_factors_are_continuous_after_a_small_sgd_step(seed):
    m = _linear(seed)
    w = m[0].weight
    aligned = make_encoding(m, "0.weight", "svd", rank=4)
    a0 = aligned.read()
    torch.manual_seed(100 + seed)
    with torch.no_grad():  # one small SGD step with a random gradient
        w -= 0.01 * torch.randn_like(w) * w.abs().mean()
    a1 = aligned.read()
    assert row_cosine(a1, a0) >= 0.99
    assert aligned.last_row_cos == pytest.approx(row_cosine(a1, a0))
    # the aligned factors are still the truncated SVD: B @ A is the best rank-r approximation
    b, a = aligned.factors
    b_ref, a_ref = truncated_svd_factors(w.detach(), 4)
    torch.testing.assert_close(b @ a, b_ref @ a_ref, atol=1e-5, rtol=1e-5)


def test_write_back_stays_exact_with_alignment():
    m = _linear(3)
    w = m[0].weight
    enc = make_encoding(m, "0.weight", "svd", rank=4)
    enc.read()
    with torch.no_grad():
        w += 0.05 * torch.randn_like(w)
    before = w.detach().clone()
    a = enc.read()
    enc.write(a)  # writing the read factor back changes nothing
    torch.testing.assert_close(w.detach(), before, atol=1e-6, rtol=0)
    assert enc.last_write_change < 1e-5
    new = a + 0.1 * torch.randn_like(a)
    enc.write(new)
    b, a_read = enc.factors
    torch.testing.assert_close(w.detach(), before + b @ (new - a_read), atol=1e-6, rtol=0)
    assert enc.last_write_change == pytest.approx(float((w.detach() - before).norm() / before.norm()), rel=1e-5)


def test_canonical_signs_and_procrustes_keep_the_product():
    torch.manual_seed(0)
    b, a = torch.randn(10, 3), torch.randn(3, 16)
    cb, ca = canonical_signs(b, a)
    torch.testing.assert_close(cb @ ca, b @ a)
    assert all(ca[i, ca[i].abs().argmax()] > 0 for i in range(3))
    q, _ = torch.linalg.qr(torch.randn(3, 3))  # an arbitrary rotation/flip of the basis
    rb, ra = procrustes_align(b @ q, q.t() @ a, b, a)
    torch.testing.assert_close(rb, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ra, a, atol=1e-5, rtol=0)


def test_unaligned_svd_flips_and_aligned_does_not():
    """Negating the weight's sign convention is invisible to the aligned reader; a raw SVD
    re-read after a small change can flip rows (what the diagnostic measures)."""
    torch.manual_seed(7)
    m = _linear(7)
    enc = make_encoding(m, "0.weight", "svd", rank=4, align=True)
    raw = make_encoding(m, "0.weight", "svd", rank=4, align=False)
    coss, raw_coss = [], []
    for _ in range(20):
        enc.read(), raw.read()
        with torch.no_grad():
            m[0].weight += 1e-3 * torch.randn_like(m[0].weight)
        enc.read(), raw.read()
        coss.append(enc.last_row_cos)
        raw_coss.append(raw.last_row_cos)
    assert min(coss) > 0.99
    assert min(raw_coss) <= max(coss)  # never better than aligned


# --------------------------------------------------------------------------- diagnostics + controls


def _mergenet_pair(**opts):
    base = mergenet_options(source="features.1.conv.weight", target="features.1.conv.weight", rank=2)
    base["layer_pairs"][0]["mode"] = "svd"
    from mergenet_core.config import deep_merge

    return tiny_pair("mergenet", deep_merge(base, opts), recipe={"epochs": 2, "steps_per_epoch": 3})


def test_per_link_diagnostics_reach_the_epoch_metrics(tmp_path):
    Engine(parse_config(_mergenet_pair(freeze_source=True)), tmp_path, progress=False).run()
    rec = read_metrics(tmp_path)[-1]
    assert rec["transfer/0/provider_factor_cos"] == pytest.approx(1.0)  # frozen source: identical reads
    assert 0.9 < rec["transfer/0/receiver_factor_cos"] <= 1.0 + 1e-6
    assert 0 < rec["transfer/0/write_change"] < 5


def _source_layer(pair: PairState, name: str = "features.1.conv.weight") -> torch.Tensor:
    return pair.roles["source"].model.get_parameter(name).detach().clone()


def test_untrained_source_control_is_frozen_at_its_seed_init_and_ignores_init_from(tmp_path):
    trained = tmp_path / "src.pt"
    fresh = PairState.build(parse_config(_mergenet_pair()))
    sd = {k: v + 1.0 for k, v in fresh.roles["source"].model.state_dict().items()}
    torch.save(sd, trained)
    cfg = _mergenet_pair(control="untrained_source")
    cfg["source"]["init_from"] = str(trained)
    pair = PairState.build(parse_config(cfg))
    init = _source_layer(pair)
    torch.testing.assert_close(init, _source_layer(fresh), rtol=0, atol=0)  # its seed's init, not the file
    assert not pair.roles["source"].trainable
    eng = Engine(parse_config(cfg), tmp_path / "run", progress=False)
    eng.run()
    torch.testing.assert_close(_source_layer(eng.pair), init, rtol=0, atol=0)  # never changes
    assert read_metrics(tmp_path / "run")[-1]["adapter/transfers"] == 3
    # the mergenet arm with the same file does load it
    cfg2 = _mergenet_pair()
    cfg2["source"]["init_from"] = str(trained)
    torch.testing.assert_close(_source_layer(PairState.build(parse_config(cfg2))), init + 1.0)


def _provider_inputs(control: str, transfers: int = 3):
    pair = PairState.build(parse_config(_mergenet_pair(control=control, freeze_source=True)))
    seen = helpers.provider_inputs(pair, transfers)  # what the adapter is given as the source matrix
    return seen, pair.method.enc[("source", "features.1.conv.weight")].read()


def test_shuffled_source_moves_every_entry_by_one_fixed_permutation():
    seen, raw = _provider_inputs("shuffled_source")
    for y in seen:
        torch.testing.assert_close(y.flatten().sort().values, raw.flatten().sort().values)  # same entries
        assert not torch.equal(y, raw)
    torch.testing.assert_close(seen[0], seen[1])  # frozen source + fixed permutation
    # entries move across rows: the rows are not raw's rows reordered (tests/test_controls.py)
    assert {tuple(sorted(r.tolist())) for r in seen[0]} != {tuple(sorted(r.tolist())) for r in raw}


def test_noise_source_matches_the_rms_and_changes_every_transfer():
    seen, raw = _provider_inputs("noise_source")
    rms = raw.pow(2).mean().sqrt()
    for y in seen:
        assert y.shape == raw.shape
        assert float(y.pow(2).mean().sqrt()) == pytest.approx(float(rms), rel=1e-5)
        assert row_cosine(y, raw) < 0.9
    assert not torch.equal(seen[0], seen[1])


def test_resume_is_exact_with_alignment_state_and_noise_stream(tmp_path):
    data = _mergenet_pair(control="noise_source")
    data["recipe"]["epochs"] = 2
    Engine(parse_config(data), tmp_path / "straight", progress=False).run()
    Engine(parse_config(data), tmp_path / "resumed", progress=False).run(stop_after_epochs=1)
    Engine(parse_config(data), tmp_path / "resumed", progress=False).run(resume=True)
    assert_same_metrics(read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed"), tol=1e-6)


def test_control_combinations_are_rejected():
    with pytest.raises(ValueError, match="control"):
        MergeNetOptions.model_validate({"layer_pairs": [{"source": "a", "target": "b"}],
                                        "control": "untrained_source", "direction": "both"})
    with pytest.raises(ValueError, match="control: 'untrained_source' needs a separate source"):
        MergeNetOptions.model_validate({"layer_pairs": [{"source": "a", "target": "b"}],
                                        "control": "untrained_source", "self_transfer": True})
    for c in ("shuffled_source", "noise_source"):  # self-transfer's negative controls: the provider scrambled
        MergeNetOptions.model_validate({"layer_pairs": [{"source": "a", "target": "b"}],
                                        "control": c, "self_transfer": True})


# --------------------------------------------------------------------------- the authors' adapter


def test_authors_preset_sets_their_values_and_explicit_fields_win():
    a = AdapterOptions.model_validate({"preset": "authors"})
    assert (a.combine, a.gelu, a.ln_eps, a.generate_dropout, a.hold_epochs, a.schedule) == (
        "mean", "tanh", 1e-12, True, 4, "cosine")
    assert (a.attn_dropout, a.ffn_dropout, a.grad_clip, a.weight_decay) == (0.1, 0.2, 50.0, 5e-4)
    b = AdapterOptions.model_validate({"preset": "authors", "hold_epochs": 1, "gelu": "erf"})
    assert (b.hold_epochs, b.gelu, b.combine) == (1, "erf", "mean")
    d = AdapterOptions.model_validate({})
    assert (d.combine, d.gelu, d.ln_eps, d.hold_epochs) == ("learned", "erf", 1e-5, 0)
    assert AdapterOptions.model_validate({"start_epoch": 3}).hold_epochs == 3  # the former name
    off = AdapterOptions.model_validate({"generate_dropout": False})
    assert off.dropouts == (0.0, 0.0)


def _sn_weight(lin: nn.Module) -> torch.Tensor:
    """Spectral normalisation W / sigma with sigma = u^T W v from the stored power-iteration vectors."""
    p = lin.parametrizations.weight
    w, u, v = p.original.detach(), p[0]._u, p[0]._v
    return w / torch.dot(u, w @ v)


def _restated_forward(adapter: ParameterAdapter, x: torch.Tensor, y: torch.Tensor, heads: int,
                      eps: float) -> torch.Tensor:
    """The authors' adapter written from docs/METHOD.md's equations (eval mode, no dropout)."""
    def ln(t, norm):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * norm.weight + norm.bias

    def gelu_tanh(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))

    def att(blk, q_tok, kv_tok):
        d = max((q_tok.shape[1] + kv_tok.shape[1]) // 2, 128) // heads
        q = q_tok @ blk.fc_q.weight.t() + blk.fc_q.bias
        k = kv_tok @ blk.fc_k.weight.t() + blk.fc_k.bias
        v = kv_tok @ blk.fc_v.weight.t() + blk.fc_v.bias
        outs = []
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            w = torch.softmax(q[:, sl] @ k[:, sl].t() / math.sqrt(d), dim=-1)
            outs.append(w @ v[:, sl])
        o = torch.cat(outs, dim=1) @ blk.fc_o.weight.t() + blk.fc_o.bias
        return ln(q_tok + o, blk.norm)

    out = x
    for ktl in adapter.layers:
        z = 0.25 * (att(ktl.att_rr, out, y) + att(ktl.att_rc, out, y.t())
                    + att(ktl.att_cr, out.t(), y).t() + att(ktl.att_cc, out.t(), y.t()).t())
        up, down = ktl.ffn_up, ktl.ffn_down
        h = gelu_tanh(z @ _sn_weight(up).t() + up.bias)
        f = h @ _sn_weight(down).t() + down.bias
        out = ln(z + f, ktl.ffn_norm)
    return out


def _authors_adapter(t_shape, s_shape):
    a = AdapterOptions.model_validate({"preset": "authors"})
    return ParameterAdapter(t_shape, s_shape, a.layers, a.heads, *a.dropouts, "none",
                            combine=a.combine, gelu=a.gelu, ln_eps=a.ln_eps)


def test_authors_preset_equals_an_independent_restatement_of_their_forward():
    torch.manual_seed(0)
    ad = _authors_adapter((12, 40), (10, 56))
    ad.eval()
    x, y = torch.randn(12, 40), torch.randn(10, 56)
    with torch.no_grad():
        got = ad(x, y)
        want = _restated_forward(ad, x, y, heads=8, eps=1e-12)
    assert (got - want).abs().max() <= 2e-5
    assert not any("mix" in n for n, _ in ad.named_parameters())  # mean mode: no mixing weights
    # and the project default (erf GELU, eps 1e-5, learned mix) computes something else
    torch.manual_seed(0)
    default = ParameterAdapter((12, 40), (10, 56), 2, 8, 0.1, 0.2, "none")
    default.eval()
    default.load_state_dict({**ad.state_dict(), **{k: v for k, v in default.state_dict().items() if "mix" in k}})
    with torch.no_grad():
        assert (default(x, y) - want).abs().max() > 1e-4


def test_authors_preset_parameter_count_for_their_pairing():
    ad = _authors_adapter((160, 960), (100, 2048))
    assert adapter_param_count(ad) == 37_633_920


# --------------------------------------------------------------------------- init_from


def _alone_cnn(tmp_path):
    """A trained tiny CNN: `mergenet train` output folder of an `alone` run (one role: target)."""
    out = tmp_path / "trained"
    Engine(parse_config(tiny_pair("alone", source_model=None, recipe={"steps_per_epoch": 3})), out,
           progress=False).run()
    return out


def test_init_from_output_folder_checkpoint_and_state_dict(tmp_path):
    out = _alone_cnn(tmp_path)
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["roles"]["target"]["model"]
    torch.save(trained, tmp_path / "plain.pt")
    for ref in (out, out / "checkpoint.pt", tmp_path / "plain.pt"):
        cfg = _mergenet_pair(freeze_source=True)
        cfg["source"]["init_from"] = str(ref)
        pair = PairState.build(parse_config(cfg))
        for k, v in pair.roles["source"].model.state_dict().items():
            torch.testing.assert_close(v, trained[k], rtol=0, atol=0)


def test_init_from_path_is_relative_to_the_config_file(tmp_path):
    out = _alone_cnn(tmp_path)
    cfg = _mergenet_pair()
    cfg["source"]["init_from"] = "../trained"
    path = write_yaml(tmp_path / "configs" / "pair.yaml", cfg)
    loaded = load_config(path)
    assert Path(loaded.source.init_from.path) == out.resolve()
    PairState.build(loaded)


def test_frozen_learned_source_keeps_its_trained_dense_weights(tmp_path):
    out = _alone_cnn(tmp_path)
    cfg = _mergenet_pair(freeze_source=True)
    cfg["method"]["options"]["layer_pairs"][0]["mode"] = "learned"
    cfg["source"]["init_from"] = str(out)
    eng = Engine(parse_config(cfg), tmp_path / "run", progress=False)
    src = eng.pair.roles["source"].model
    assert type(src.get_submodule("features.1.conv")) is nn.Conv2d  # not truncated to rank r
    before = src.state_dict()["features.1.conv.weight"].clone()
    eng.run()
    torch.testing.assert_close(src.state_dict()["features.1.conv.weight"], before, rtol=0, atol=0)
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["roles"]["target"]["model"]
    torch.testing.assert_close(before, trained["features.1.conv.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such file"),
    ("shape", "parameter 'features.0.conv.weight' has shape"),
    ("model", "is missing from the file"),
    ("malicious", "refused by the weights-only loader"),
    ("garbage", "refused by the weights-only loader"),
    ("truncated", "not a readable checkpoint"),
])
def test_bad_init_from_is_one_line_naming_the_field(tmp_path, capsys, case, needle):
    from mergenet_core.models import build_model
    from mergenet_core.data.base import TaskInfo

    f = tmp_path / "w.pt"
    info = TaskInfo(name="image", modality="image", num_classes=10, in_channels=1, image_size=28)
    if case == "shape":
        torch.save(build_model("cnn", {"channels": [4, 16], "hidden": 32}, info).state_dict(), f)
    elif case == "model":
        torch.save(build_model("resnet18", {"width": 8, "blocks": [1, 1, 1, 1]}, info).state_dict(), f)
    elif case == "malicious":
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        f.write_bytes(pickle.dumps(Evil()))
    elif case == "garbage":
        f.write_bytes(b"not a checkpoint at all")
    elif case == "truncated":
        torch.save(build_model("cnn", {"channels": [8, 16], "hidden": 32}, info).state_dict(), f)
        f.write_bytes(f.read_bytes()[:300])
    cfg = _mergenet_pair()
    cfg["source"]["init_from"] = str(f)
    path = write_yaml(tmp_path / "pair.yaml", cfg)
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source.init_from" in err[0] and needle in err[0], err
    assert "pwned" not in capsys.readouterr().out
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before any training


# --------------------------------------------------------------------------- safe layer pairs


def test_normalised_layers_of_our_models():
    from mergenet_core.data.base import TaskInfo
    from mergenet_core.models import build_model
    from mergenet_core.models.inspect import normalised_layers

    info = TaskInfo(name="image", modality="image", num_classes=10, in_channels=3, image_size=32)
    mbv2 = normalised_layers(build_model("mobilenetv2", {"width_mult": 0.25}, info))
    assert "features.16.project.conv" in mbv2 and "classifier" not in mbv2
    r18 = normalised_layers(build_model("resnet18", {"width": 8, "blocks": [1, 1, 1, 1]}, info))
    assert {"layer4.0.conv1", "layer4.0.downsample.0"} <= r18 and "fc" not in r18


def test_pairs_ranks_normalised_targets_first_and_marks_the_classifier(capsys):
    assert main(["pairs", "resnet18", "mobilenetv2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cls = next(l for l in lines if l.split() and l.split()[0] == "classifier.weight")
    assert "UNNORMALISED" in cls
    start = next(i for i, l in enumerate(lines) if l.startswith("# target candidates"))
    first = lines[start + 1]
    assert "UNNORMALISED" not in first
    sug = lines[lines.index("# suggested layer pairs (source -> target)") + 1]
    assert "classifier.weight" not in sug


def test_validate_warns_for_an_unnormalised_mergenet_target(tmp_path, capsys):
    cfg = tiny_pair("mergenet", mergenet_options())  # classifier -> classifier
    path = write_yaml(tmp_path / "pair.yaml", cfg)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == f"ok: {path}"
    warns = [l for l in out.err.splitlines() if l.startswith("warning:")]
    assert len(warns) == 1 and "layer_pairs.0.target" in warns[0] and "classifier.weight" in warns[0]
    ok = write_yaml(tmp_path / "ok.yaml", _mergenet_pair())
    assert main(["validate", str(ok)]) == 0
    assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]


def test_shipped_configs_have_no_layer_pair_warnings(capsys):
    root = helpers.ROOT
    files = sorted(str(p) for p in (root / "experiments").glob("*.yaml"))  # study grids: tests/test_study.py
    assert main(["validate", *files]) == 0
    assert not [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]


def test_val_size_draws_validation_from_the_rest_of_train():
    from mergenet_core.data import build_task

    t = build_task("fashion_mnist", {"train_subset": 500, "val_size": 300, "test_subset": 200}, seed=3)
    assert (len(t.train), len(t.val), len(t.test)) == (500, 300, 200)
    assert torch.bincount(t.train.y).tolist() == [50] * 10 and torch.bincount(t.val.y).tolist() == [30] * 10
    tr = {bytes(x.numpy().tobytes()) for x in t.train.x}
    assert not any(bytes(x.numpy().tobytes()) in tr for x in t.val.x)  # disjoint images
    again = build_task("fashion_mnist", {"train_subset": 500, "val_size": 300, "test_subset": 200}, seed=3)
    assert torch.equal(again.val.y, t.val.y)


def test_adapter_width_fixes_the_model_width():
    from mergenet_core.methods.mergenet.adapter import head_width

    wide = ParameterAdapter((4, 1280), (4, 64), 1, 4)
    narrow = ParameterAdapter((4, 1280), (4, 64), 1, 4, width=64)
    assert adapter_param_count(narrow) < adapter_param_count(wide) / 10
    assert head_width(1280, 64, 4, width=64) == 16 and head_width(1280, 64, 4) == 168
    ktl = narrow.layers[0]
    assert ktl.att_rr.fc_q.out_features == 64 and ktl.ffn_up.out_features == 64
    x, y = torch.randn(4, 1280), torch.randn(4, 64)
    assert narrow(x, y).shape == (4, 1280)
    with pytest.raises(ValueError, match="width"):
        AdapterOptions.model_validate({"width": 4, "heads": 8})


def test_gated_adapter_starts_as_the_identity_and_learns_its_gate(tmp_path):
    torch.manual_seed(0)
    ad = ParameterAdapter((4, 30), (4, 50), 1, 2, output_scale="rms", gate=True)
    x, y = torch.randn(4, 30), torch.randn(4, 50)
    out = ad(x, y, reference=x)
    torch.testing.assert_close(out, x)  # g = 0: writes back its input
    out.backward(torch.randn_like(out))
    assert ad.gate.grad is not None and float(ad.gate.grad.abs()) > 0
    # in a pair: the first transfer writes (almost) nothing
    Engine(parse_config(_mergenet_pair(adapter={"gate": True})), tmp_path, progress=False).run()
    rec = read_metrics(tmp_path)[0]
    assert rec["transfer/0/write_change"] < 0.05


def test_untrained_source_of_a_pretrained_model_is_randomly_initialised():
    from mergenet_core.methods.base import Method  # noqa: F401  (registry import)

    text = {"name": "rotten_tomatoes", "options": {"max_length": 16, "train_subset": 64, "test_subset": 32}}
    l3 = {"name": "minilm_l3", "options": {"num_layers": 1}}
    opts = mergenet_options(source="bert.encoder.layer.0.attention.output.dense.weight",
                            target="bert.encoder.layer.0.attention.output.dense.weight", rank=2)
    opts["layer_pairs"][0]["mode"] = "svd"
    base = tiny_pair("mergenet", opts, source_model=l3, target_model=l3, task=text)
    trained = PairState.build(parse_config(base))
    ctl = PairState.build(parse_config({**base, "method": {"name": "mergenet",
                                                            "options": {**opts, "control": "untrained_source"}}}))
    name = "bert.embeddings.word_embeddings.weight"
    w_pre = trained.roles["source"].model.get_parameter(name)
    w_ctl = ctl.roles["source"].model.get_parameter(name)
    assert not torch.allclose(w_pre, w_ctl)  # not the pretrained encoder
    # the target keeps its pretrained weights in both arms
    torch.testing.assert_close(trained.roles["target"].model.get_parameter(name),
                               ctl.roles["target"].model.get_parameter(name))


def test_validate_states_the_adapters_size_and_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    """The adapters' parameters and training memory are stated; adapters that would not fit the
    memory of the device they train on are refused with the field named (the machine's memory
    stands in for a GPU's here: the bytes per parameter are raised until they cannot fit)."""
    from mergenet_core.methods.mergenet import method as mergenet_method

    path = write_yaml(tmp_path / "ok.yaml", _mergenet_pair())
    assert main(["validate", str(path)]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "method.options.adapter: 1 adapter(s), " in notes[0] and " MiB to train" in notes[0]
    monkeypatch.setattr(mergenet_method, "ADAPTER_BYTES_PER_PARAM", 2**40)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: method.options.adapter: the adapters (")
    assert "GiB to train but this machine's memory has" in err[0], err
