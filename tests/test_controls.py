"""Negative controls that can fail: no symmetry of the adapter undoes them (issue 33).

The adapter reads the source matrix ``Y [P, Q]`` only as attention keys and values: the ``rr`` and
``cr`` blocks see its P rows as tokens of width Q, the ``rc`` and ``cc`` blocks its Q columns as
tokens of width P. Attention has no positions, so permuting tokens changes nothing, and a signed
permutation of the token features equals a signed permutation of the input columns of
``fc_k``/``fc_v``, whose initialisation is i.i.d. and symmetric. So any ``S1 Y S2`` (``S`` signed
permutations) is the real source seen by a relabelled adapter: a "control" of that form has an
expected difference of exactly 0 from the real arm, whatever the source knows. These tests show
that the former control had that form and that none of the present ones has it.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import mergenet_options, provider_inputs, tiny_pair
from mergenet_core.config import deep_merge
from mergenet_core.methods.mergenet.adapter import ParameterAdapter
from mergenet_core.methods.mergenet.method import scramble_entries
from mergenet_core.training.engine import PairState
from orchestrator.config import parse_config


def relabelling_invariant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What every ``S1 y S2`` (signed row and column permutations) shares with ``y``: the sorted
    list of its rows' sorted absolute values, and the same of its columns."""
    def rows(m):
        r = m.abs().sort(dim=1).values
        return r[torch.argsort(r[:, 0] + 1e3 * r.sum(1))]
    return rows(y), rows(y.t())


def same_orbit(a: torch.Tensor, b: torch.Tensor) -> bool:
    (ra, ca), (rb, cb) = relabelling_invariant(a), relabelling_invariant(b)
    return bool(torch.allclose(ra, rb, atol=1e-6) and torch.allclose(ca, cb, atol=1e-6))


def _old_row_column_shuffle(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The control before issue 33: one permutation of rows and one of columns."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.randperm(y.shape[0], generator=g), torch.randperm(y.shape[1], generator=g)
    return y[rows][:, cols], rows, cols


def _relabel(adapter: ParameterAdapter, rows: torch.Tensor, cols: torch.Tensor) -> ParameterAdapter:
    """The adapter whose ``fc_k``/``fc_v`` input columns are permuted so that it reads ``y`` as
    ``adapter`` reads ``y[rows][:, cols]``."""
    out = copy.deepcopy(adapter)
    with torch.no_grad():
        for layer in out.layers:
            for block, perm in ((layer.att_rr, cols), (layer.att_cr, cols), (layer.att_rc, rows), (layer.att_cc, rows)):
                for fc in (block.fc_k, block.fc_v):
                    w = fc.weight.clone()
                    fc.weight[:, perm] = w
    return out


def _adapter(anchor: str, shape=(6, 10)) -> ParameterAdapter:
    torch.manual_seed(0)
    return ParameterAdapter(shape, shape, layers=2, heads=2, width=16, anchor=anchor).eval()


@pytest.mark.parametrize("anchor", ["target", "source"])
def test_the_former_row_column_shuffle_was_a_relabelling_the_entry_scramble_is_not(anchor):
    torch.manual_seed(1)
    x, y = torch.randn(6, 10), torch.randn(6, 10)
    adapter = _adapter(anchor)
    if anchor == "source":  # open the departure so the KTL stack shapes the output too
        with torch.no_grad():
            adapter.depart.fill_(0.5)
    old, rows, cols = _old_row_column_shuffle(y, 7)
    with torch.no_grad():
        relabelled_on_real = _relabel(adapter, rows, cols)(x, y)
        on_old = adapter(x, old)
        on_new = adapter(x, scramble_entries(y, 7))
        on_real = adapter(x, y)
    scale = float(on_real.norm())
    if anchor == "target":
        # the former control IS the real source under another adapter initialisation
        assert float((on_old - relabelled_on_real).norm()) / scale < 1e-5
    else:
        # with the source as anchor the proposal starts from Y in place: the former control moved it
        assert float((on_old - relabelled_on_real).norm()) / scale > 0.05
    assert same_orbit(old, y)  # the invariant sees the relabelling ...
    assert not same_orbit(scramble_entries(y, 7), y)  # ... and that the entry scramble is none
    assert float((on_new - on_real).norm()) / scale > 0.05
    assert float((on_new - relabelled_on_real).norm()) / scale > 0.05


def test_scramble_entries_keeps_the_values_and_is_fixed_by_its_seed():
    y = torch.randn(4, 12)
    s = scramble_entries(y, 3)
    torch.testing.assert_close(s.flatten().sort().values, y.flatten().sort().values)
    assert torch.equal(s, scramble_entries(y, 3)) and not torch.equal(s, scramble_entries(y, 4))
    # rows mix values of different rows of y: no row of s is a permutation of a row of y
    rows_y = {tuple(sorted(r.tolist())) for r in y}
    assert not any(tuple(sorted(r.tolist())) in rows_y for r in s)


def _moved_weights(cfg: dict, path) -> str:
    """A state file of the source moved away from its initialisation (a stand-in for training)."""
    g = torch.Generator().manual_seed(5)
    sd = PairState.build(parse_config(cfg)).roles["source"].model.state_dict()
    torch.save({k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in sd.items()}, path)
    return str(path)


def _provider_inputs(control: str | None, transfers: int = 2, donor: str | None = None,
                     **opts) -> tuple[list, torch.Tensor]:
    """What the adapter is given as the provider matrix at each transfer of a real pair, and the
    provider's own factor (read after the transfers); ``donor``: the source's ``init_from``."""
    one = bool(opts.get("self_transfer"))
    provider = "features.0.conv.weight" if one else "features.1.conv.weight"
    base = mergenet_options(source=provider, target="features.1.conv.weight", rank=2)
    base["layer_pairs"][0]["mode"] = "svd"
    if control:
        base["control"] = control
    cfg = tiny_pair("mergenet", deep_merge(base, opts), recipe={"epochs": 1, "steps_per_epoch": transfers},
                    **({"source_model": None} if one else {}))
    if donor:
        cfg["source"]["init_from"] = donor
    pair = PairState.build(parse_config(cfg))
    seen = provider_inputs(pair, transfers)
    return seen, pair.method.enc[("target" if one else "source", provider)].read()


@pytest.mark.parametrize("control,opts", [
    ("shuffled_source", {"freeze_source": True}),
    ("noise_source", {"freeze_source": True}),
    ("untrained_source", {}),
    ("shuffled_source", {"self_transfer": True}),
    ("noise_source", {"self_transfer": True}),
])
def test_no_control_is_a_relabelling_of_the_real_source(control, opts, tmp_path):
    """Every MergeNet control, on a real pair whose source starts from moved ("trained") weights:
    what the adapter sees is not a signed row/column permutation of what the real arm sees."""
    if not opts.get("self_transfer"):
        cfg = tiny_pair("kd")
        opts = {**opts, "donor": _moved_weights(cfg, tmp_path / "donor.pt")}
    real, raw = _provider_inputs(None, **opts)
    seen, _ = _provider_inputs(control, **opts)
    assert not any(same_orbit(s, r) for s in seen for r in real)
    if control == "shuffled_source":  # the first transfer (before any step): the real arm's values, moved
        torch.testing.assert_close(seen[0].flatten().sort().values, real[0].flatten().sort().values)
        if opts.get("freeze_source"):  # a frozen source: the same positions at every transfer
            torch.testing.assert_close(seen[0], seen[1])
            torch.testing.assert_close(seen[0].flatten().sort().values, raw.flatten().sort().values)


def test_untrained_transplant_is_not_the_trained_copy_relabelled(tmp_path):
    """The transplant's control copies the donor architecture at its initialisation: its weights
    are no signed row/column permutation of the trained donor's (tested on a donor moved away
    from its initialisation)."""
    cfg = tiny_pair("transplant", {"layers": "all"})
    cfg["source"] = copy.deepcopy(cfg["target"])
    trained = tmp_path / "donor.pt"
    fresh = PairState.build(parse_config(cfg))
    sd = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
          for k, v in fresh.roles["source"].model.state_dict().items()}
    torch.save(sd, trained)
    cfg["source"]["init_from"] = str(trained)
    copied = PairState.build(parse_config(cfg)).roles["target"].model.state_dict()
    cfg["method"]["options"]["control"] = "untrained_source"
    control = PairState.build(parse_config(cfg)).roles["target"].model.state_dict()
    mats = [k for k, v in copied.items() if v.dim() >= 2]
    assert mats
    for k in mats:
        assert not same_orbit(control[k].flatten(1), copied[k].flatten(1))
