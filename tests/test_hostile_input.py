"""Hostile and broken YAML: bounded size, nesting and alias expansion, strict UTF-8, short
error lines. Each case exits 2 with one ``error:`` line naming the file, in well under a
second of parsing, without echoing more than a short prefix of the offending value."""
from __future__ import annotations

import time

import pytest
import yaml

from helpers import fmnist_task, tiny_grid, tiny_pair, write_yaml
from mergenet_core.io.safe_yaml import MAX_BYTES, MAX_DEPTH, MAX_NODES, Loader
from orchestrator.cli import MAX_LINE, main


def _bomb(levels: int = 9, fan: int = 10) -> str:
    """ "Billion laughs": a few hundred bytes that expand to fan**levels scalars."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fan) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def _grid_with_axis(value_yaml: str) -> str:
    g = tiny_grid("hostile", task=fmnist_task(64, 32, val_fraction=None), epochs=1, steps_per_epoch=1,
                  target_model={"name": "cnn"}, methods={"alone": {}}, seeds=[0])
    return _bomb() + yaml.safe_dump(g, sort_keys=False) + f"search:\n  recipe.optimizer.lr: {{grid: [{value_yaml}]}}\n"


def _one_error_line(capsys, needle: str) -> str:
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert len(err[0]) <= MAX_LINE
    return err[0]


def _validate(path) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = main(["validate", str(path)])
    return rc, time.perf_counter() - t0


def test_c_loader_is_used_where_installed():
    assert Loader is getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def test_alias_bomb_as_search_axis_value_is_refused_fast(tmp_path, capsys):
    path = write_yaml(tmp_path / "bomb.yaml", _grid_with_axis("*a8"))
    rc, s = _validate(path)
    assert rc == 2 and s < 5
    _one_error_line(capsys, "bomb.yaml: YAML expands to more than")


def test_alias_bomb_in_a_set_override_is_refused(tmp_path, capsys):
    path = write_yaml(tmp_path / "ok.yaml", tiny_pair())
    bomb = "{" + _bomb(6).replace("\n", ", ").rstrip(", ") + "}"
    rc = main(["validate", str(path), "--set", f"recipe.optimizer.lr={bomb}"])
    assert rc == 2
    _one_error_line(capsys, "expands to more than")


def test_small_shared_value_is_echoed_only_as_a_prefix(tmp_path, capsys):
    """Below the limit, an aliased value still fails validation: the line quotes a prefix only."""
    path = write_yaml(tmp_path / "shared.yaml", _grid_with_axis("*a3"))  # 10**4 scalars, under MAX_NODES
    rc, _ = _validate(path)
    assert rc == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err and all(len(l) <= MAX_LINE for l in err), [len(l) for l in err]
    assert sum(len(l) for l in err) < 2000


def test_huge_file_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    with open(path, "w") as f:
        f.write("name: x\n")
        f.write("# padding\n" * (18 * 1024 * 1024 // 10))  # 18 MB, as in the probe
    rc, s = _validate(path)
    assert rc == 2 and s < 5
    _one_error_line(capsys, "larger than the")


def test_deep_nesting_is_refused(tmp_path, capsys):
    path = write_yaml(tmp_path / "deep.yaml", "recipe: " + "[" * 100_000 + "]" * 100_000 + "\n")
    rc, s = _validate(path)
    assert rc == 2 and s < 5
    # what we promise: one clean line naming the file and the problem. Which parser refuses
    # first depends on the installed PyYAML: the project's event check ("nested deeper than
    # 32 levels") or libyaml's own limit ("exceeded maximum nesting depth", PyYAML >= 6.0.4)
    line = _one_error_line(capsys, "deep.yaml")
    assert "nest" in line.lower(), line


def test_nesting_just_past_our_limit_is_refused_with_our_message(tmp_path, capsys):
    """Below any parser's own limit, the project's depth check is what refuses the file."""
    path = write_yaml(tmp_path / "deep33.yaml", "recipe: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    assert main(["validate", str(path)]) == 2
    _one_error_line(capsys, f"deep33.yaml: YAML nested deeper than {MAX_DEPTH} levels")


@pytest.mark.parametrize("raw, needle", [
    (b"name: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 9)"),
    (b"\xff\xfe\x00n\x00a\x00m\x00e\x00", "not UTF-8 text"),
    (b"name: a\x00b\n", "NUL byte"),
], ids=["latin1", "utf16", "nul"])
def test_undecodable_bytes_one_line(tmp_path, capsys, raw, needle):
    path = tmp_path / "bin.yaml"
    path.write_bytes(raw)
    assert main(["validate", str(path)]) == 2
    _one_error_line(capsys, needle)


def test_long_values_and_keys_are_cut_in_error_lines(tmp_path, capsys):
    long = "x" * 200_000
    path = write_yaml(tmp_path / "long.yaml", tiny_pair(name=long, recipe={"optimizer": {"name": long}}))
    assert main(["validate", str(path), "--set", f"target.{long}=1"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err and all(len(l) <= MAX_LINE for l in err), [len(l) for l in err]
    assert not any(long[:500] in l for l in err)


def test_limits_are_generous_for_real_configs():
    assert MAX_BYTES >= 256 * 1024 and MAX_DEPTH >= 16 and MAX_NODES >= 10_000
