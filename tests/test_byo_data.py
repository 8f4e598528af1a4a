"""Bring-your-own data: image folders (in memory and streamed from disk), text tables, data sets
saved with ``datasets.save_to_disk``, and ``val_size`` without ``train_subset``. All on real
offline data written by the tests: Fashion-MNIST PNGs and Rotten Tomatoes snippets."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergenet_core.data import BatchStream, build_task, iter_eval, probe_task
from mergenet_core.data.common import SplitOptions, make_splits, split_sizes
from mergenet_core.data.folder import ImageFiles
from mergenet_core.data.images import FMNIST_CLASSES, FMNIST_ROOT, read_idx
from mergenet_core.data.text import TextOptions, _rotten_tomatoes_raw, _rt_folder
from mergenet_core.errors import ConfigError, DataMissingError

#: class folder names: sorted, they are not in Fashion-MNIST's label order
NAMES = [n.replace("/", "-") for n in FMNIST_CLASSES]
ORDER = sorted(range(10), key=lambda k: NAMES[k])  # folder class number -> Fashion-MNIST label


@pytest.fixture(scope="module")
def fmnist():
    """The first 400 Fashion-MNIST test images and labels (uint8 [N, 28, 28], int)."""
    base = Path(FMNIST_ROOT)
    return (read_idx(base / "t10k-images-idx3-ubyte.gz", 0x803)[:400],
            read_idx(base / "t10k-labels-idx1-ubyte.gz", 0x801)[:400].astype(np.int64))


def _write(root: Path, x: np.ndarray, y: np.ndarray, layout: dict[str, range]) -> Path:
    from PIL import Image

    for split, rows in layout.items():
        for k in range(10):
            (root / split / NAMES[k]).mkdir(parents=True, exist_ok=True)
        for i in rows:
            Image.fromarray(x[i]).save(root / split / NAMES[y[i]] / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def folder(fmnist, tmp_path_factory) -> Path:
    """train/ (300 PNGs) and test/ (100)."""
    return _write(tmp_path_factory.mktemp("fm"), *fmnist, {"train": range(300), "test": range(300, 400)})


@pytest.fixture(scope="module")
def folder_val(fmnist, tmp_path_factory) -> Path:
    """train/ (200 PNGs) and val/ (60), no test/."""
    return _write(tmp_path_factory.mktemp("fmv"), *fmnist, {"train": range(200), "val": range(200, 260)})


def _sizes(d) -> tuple[int, int, int]:
    return len(d.train), len(d.val), len(d.test)


def _shape_sizes(s) -> tuple[int, int, int]:
    return s.train, s.val, s.test


# ------------------------------------------------------------------ image_folder

def test_image_folder_decodes_the_files_exactly(folder, fmnist):
    """28x28 grey PNGs at image_size 28, channels 1 are the original pixels; classes are the sorted
    folder names; the official test split is the test/ folder in file order."""
    x, y = fmnist
    d = build_task("image_folder", {"root": str(folder), "image_size": 28, "channels": 1}, seed=0)
    assert d.class_names == sorted(NAMES) and d.info.num_classes == 10 and d.info.modality == "image"
    assert (d.info.in_channels, d.info.image_size) == (1, 28) and len(d.info.mean) == 1
    rows = [i for k in range(10) for i in range(300, 400) if y[i] == ORDER[k]]
    assert d.test.x.dtype == torch.uint8 and d.test.x.shape == (100, 1, 28, 28)
    assert torch.equal(d.test.x[:, 0], torch.from_numpy(x[rows]))
    assert [ORDER[k] for k in d.test.y.tolist()] == y[rows].tolist()
    rgb = build_task("image_folder", {"root": str(folder), "image_size": 32}, seed=0)
    assert rgb.train.x.shape[1:] == (3, 32, 32) and len(rgb.info.mean) == 3
    assert torch.equal(rgb.test.x[:, 0], rgb.test.x[:, 2])  # grey source: R = G = B
    given = build_task("image_folder", {"root": str(folder), "mean": [0.5], "std": [0.25], "channels": 1}, seed=0)
    assert (given.info.mean, given.info.std) == ((0.5,), (0.25,))


def test_streamed_folder_gives_the_same_batches_and_resumes(folder):
    """in_memory false (2 DataLoader workers): the same batches in the same order as in memory,
    across epochs, after a state_dict / load_state_dict resume, and in evaluation."""
    opts = {"root": str(folder), "image_size": 32, "val_size": 40}
    mem = build_task("image_folder", {**opts, "in_memory": True}, seed=3)
    lazy = build_task("image_folder", {**opts, "in_memory": False, "workers": 2}, seed=3)
    assert isinstance(lazy.train.x, ImageFiles) and isinstance(mem.train.x, torch.Tensor)
    assert _sizes(mem) == _sizes(lazy) == (260, 40, 100) and mem.info == lazy.info
    assert torch.equal(mem.val.y, lazy.val.y) and torch.equal(mem.val.x, lazy.val.x.load())
    a, b = BatchStream(mem.train, 32, seed=5), BatchStream(lazy.train, 32, seed=5)
    want = [a.next() for _ in range(20)]  # 6 batches per epoch: 3 epochs and a bit
    for i, (wx, wy) in enumerate(want[:7]):
        bx, by = b.next()
        assert torch.equal(wx, bx) and torch.equal(wy, by), i
    assert "MultiProcessing" in type(b._ahead).__name__  # decoded ahead by the 2 worker processes
    resumed = BatchStream(lazy.train, 32, seed=5)
    resumed.load_state_dict(b.state_dict())
    b.close()
    for i, (wx, wy) in enumerate(want[7:], start=7):
        rx, ry = resumed.next()
        assert torch.equal(wx, rx) and torch.equal(wy, ry), i
    for split in ("val", "test"):
        got = list(iter_eval(getattr(lazy, split), 32))
        exp = list(iter_eval(getattr(mem, split), 32))
        assert len(got) == len(exp) == (2 if split == "val" else 4)
        assert all(torch.equal(g[0], e[0]) and torch.equal(g[1], e[1]) for g, e in zip(got, exp))


def test_in_memory_auto_follows_the_budget(folder):
    small = build_task("image_folder", {"root": str(folder), "memory_mb": 0.1, "workers": 0}, seed=0)
    big = build_task("image_folder", {"root": str(folder), "workers": 0}, seed=0)
    assert isinstance(small.train.x, ImageFiles) and isinstance(big.train.x, torch.Tensor)
    assert torch.equal(small.test.x.load(), big.test.x) and small.test.x.shape == big.test.x.shape
    assert torch.equal(small.train.x[3], big.train.x[3])  # an int index decodes one image


@pytest.mark.parametrize("extra", [{}, {"val_size": 30}, {"train_subset": 100, "val_size": 50},
                                   {"test_subset": 20, "val_fraction": 0.25}, {"val_pool": 60, "val_size": 20}])
def test_image_folder_probe_sizes_equal_build_sizes(folder, extra):
    opts = {"root": str(folder), "image_size": 16, "in_memory": False, **extra}
    shape, d = probe_task("image_folder", opts), build_task("image_folder", opts, seed=1)
    assert _shape_sizes(shape) == _sizes(d) and shape.info.num_classes == 10
    assert (shape.info.in_channels, shape.info.image_size) == (3, 16)


def test_image_folder_val_folder_and_test_carve(folder_val, fmnist):
    """With val/: validation is that folder (val_size draws from it); without test/: a fixed
    carve of train/; val_from carve ignores val/."""
    root = str(folder_val)
    d = build_task("image_folder", {"root": root, "image_size": 28, "channels": 1}, seed=0)
    assert _sizes(d) == (160, 60, 40) == _shape_sizes(probe_task("image_folder", {"root": root}))
    assert "test carve" in d.info.description
    x, y = fmnist
    val_rows = [i for k in range(10) for i in range(200, 260) if y[i] == ORDER[k]]
    assert torch.equal(d.val.x[:, 0], torch.from_numpy(x[val_rows]))
    other = build_task("image_folder", {"root": root, "image_size": 28, "channels": 1}, seed=7)
    assert torch.equal(other.test.x, d.test.x) and torch.equal(other.val.x, d.val.x)  # seed-independent
    sub = {"root": root, "val_size": 25, "train_subset": 100, "in_memory": False}
    assert _sizes(build_task("image_folder", sub, seed=0)) == (100, 25, 40) == _shape_sizes(
        probe_task("image_folder", sub))
    carve = {"root": root, "val_from": "carve", "in_memory": False}
    assert _sizes(build_task("image_folder", carve, seed=0)) == (144, 16, 40)
    with pytest.raises(ConfigError, match="val_from: carve"):
        probe_task("image_folder", {"root": root, "val_pool": 20})


def test_image_folder_errors_are_clear(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shutil.rmtree(bad / "test" / NAMES[4])
    for call in (lambda o: probe_task("image_folder", o), lambda o: build_task("image_folder", o, 0)):
        with pytest.raises(DataMissingError, match=rf"class folders differ.*missing: \['{NAMES[4]}'\]"):
            call({"root": str(bad)})
    with pytest.raises(DataMissingError, match="expected .*train/<class>"):
        probe_task("image_folder", {"root": str(tmp_path / "nowhere")})
    shutil.rmtree(bad / "test")
    for f in (bad / "train" / NAMES[2]).iterdir():
        f.unlink()
    with pytest.raises(DataMissingError, match="no images"):
        probe_task("image_folder", {"root": str(bad)})
    (bad / "train" / NAMES[2] / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataMissingError, match="broken.png: not a readable image"):
        build_task("image_folder", {"root": str(bad), "workers": 0}, 0)
    with pytest.raises(Exception, match="mean"):
        probe_task("image_folder", {"root": str(folder), "mean": [0.5, 0.5, 0.5]})


# ------------------------------------------------------------------ text_table and hf_text

@pytest.fixture(scope="module")
def rt_rows():
    """300 Rotten Tomatoes snippets, both classes (string labels)."""
    texts, labels = _rotten_tomatoes_raw(_rt_folder(TextOptions()))
    fresh = [i for i, v in enumerate(labels) if v == 0][:150]
    rotten = [i for i, v in enumerate(labels) if v == 1][:150]
    rows = [i for pair in zip(fresh, rotten) for i in pair]
    return [texts[i] for i in rows], ["fresh" if labels[i] == 0 else "rotten" for i in rows]


@pytest.fixture(scope="module")
def tables(rt_rows, tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("tables")
    t = pa.table({"review": rt_rows[0], "sentiment": rt_rows[1]})
    (root / "csv").mkdir()
    pacsv.write_csv(t.slice(0, 240), root / "csv" / "train.csv")
    pacsv.write_csv(t.slice(240), root / "csv" / "test.csv")
    pq.write_table(t, root / "all.parquet")
    with open(root / "ints.jsonl", "w") as f:  # integer labels: the class numbers themselves
        for text, label in zip(*rt_rows):
            f.write(json.dumps({"text": text, "label": int(label == "rotten")}) + "\n")
    return root


def test_text_table_csv_and_parquet(tables, rt_rows):
    from mergenet_core.data.text import get_tokenizer

    opts = {"text_column": "review", "label_column": "sentiment", "max_length": 32}
    d = build_task("text_table", {"root": str(tables / "csv"), **opts}, seed=0)
    assert d.info.modality == "text" and d.class_names == ["fresh", "rotten"] and d.info.vocab_size == 30522
    assert _sizes(d) == (216, 24, 60) == _shape_sizes(probe_task("text_table", {"root": str(tables / "csv"), **opts}))
    ids = d.test.x["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (60, 32) and (ids[:, 0] == 101).all()
    want = get_tokenizer()(rt_rows[0][240:], padding="max_length", truncation=True, max_length=32,
                           return_tensors="pt")["input_ids"]
    assert torch.equal(ids, want) and d.test.y.tolist() == [int(v == "rotten") for v in rt_rows[1][240:]]
    flipped = build_task("text_table", {"root": str(tables / "csv"), **opts, "labels": ["rotten", "fresh"]}, seed=0)
    assert flipped.class_names == ["rotten", "fresh"] and torch.equal(flipped.test.y, 1 - d.test.y)
    p = {"root": str(tables / "all.parquet"), **opts, "val_size": 30}
    q = build_task("text_table", p, seed=0)
    assert _sizes(q) == (210, 30, 60) == _shape_sizes(probe_task("text_table", p))
    assert "test carve" in q.info.description
    assert torch.bincount(q.test.y).tolist() == [30, 30]
    ints = build_task("text_table", {"root": str(tables / "ints.jsonl"), "val_size": 30, "max_length": 32}, seed=0)
    assert ints.class_names == ["0", "1"] and torch.equal(ints.test.y, q.test.y)
    assert torch.equal(ints.test.x["input_ids"], q.test.x["input_ids"])
    with pytest.raises(DataMissingError, match="no column 'text'"):
        probe_task("text_table", {"root": str(tables / "csv")})
    with pytest.raises(DataMissingError, match="not among the 2 classes"):
        probe_task("text_table", {"root": str(tables / "csv"), **opts, "labels": ["fresh", "stale"]})


def test_hf_text_equals_the_same_table(tables, rt_rows, tmp_path):
    """A DatasetDict saved with save_to_disk (ClassLabel labels) gives the splits the CSV tables
    of the same rows give."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["fresh", "rotten"])})
    cols = lambda a, b: {"text": rt_rows[0][a:b], "label": [int(v == "rotten") for v in rt_rows[1][a:b]]}  # noqa: E731
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(cols(0, 240), features=feats),
                          "test": datasets.Dataset.from_dict(cols(240, 300), features=feats)}).save_to_disk(
        str(tmp_path / "hf"))
    hf = build_task("hf_text", {"root": str(tmp_path / "hf"), "max_length": 32}, seed=4)
    csv = build_task("text_table", {"root": str(tables / "csv"), "text_column": "review",
                                    "label_column": "sentiment", "max_length": 32}, seed=4)
    assert hf.class_names == csv.class_names and hf.info.vocab_size == csv.info.vocab_size
    for s in ("train", "val", "test"):
        a, b = getattr(hf, s), getattr(csv, s)
        assert torch.equal(a.y, b.y) and torch.equal(a.x["input_ids"], b.x["input_ids"]), s
    assert _sizes(hf) == _shape_sizes(probe_task("hf_text", {"root": str(tmp_path / "hf")}))
    with pytest.raises(DataMissingError, match="no split 'training'"):
        probe_task("hf_text", {"root": str(tmp_path / "hf"), "train_split": "training"})


def test_hf_images_in_memory_and_streamed(fmnist, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    x, y = fmnist
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    part = lambda a, b: datasets.Dataset.from_dict(  # noqa: E731
        {"img": [Image.fromarray(a_) for a_ in x[a:b]], "label": y[a:b].tolist()}, features=feats)
    datasets.DatasetDict({"train": part(0, 200), "validation": part(200, 240)}).save_to_disk(str(tmp_path / "hfi"))
    opts = {"root": str(tmp_path / "hfi"), "image_column": "img", "image_size": 28, "channels": 1}
    d = build_task("hf_images", opts, seed=0)
    assert d.class_names == [str(k) for k in range(10)] and _sizes(d) == (160, 40, 40)
    assert _sizes(d) == _shape_sizes(probe_task("hf_images", opts))
    assert torch.equal(d.val.x[:, 0], torch.from_numpy(x[200:240].copy())) and d.val.y.tolist() == y[200:240].tolist()
    lazy = build_task("hf_images", {**opts, "in_memory": False, "workers": 2}, seed=0)
    a, b = BatchStream(d.train, 32, seed=1), BatchStream(lazy.train, 32, seed=1)
    for _ in range(7):
        (ax, ay), (bx, by) = a.next(), b.next()
        assert torch.equal(ax, bx) and torch.equal(ay, by)


def test_hf_without_datasets_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataMissingError, match=r"pip install 'mergenet\[hf\]'"):
        probe_task("hf_text", {"root": str(tmp_path / "no-such-set")})


# ------------------------------------------------------------------ val_size without train_subset

def test_val_size_without_train_subset_fashion_mnist():
    d = build_task("fashion_mnist", {"val_size": 5000}, seed=1)
    assert _sizes(d) == (55_000, 5_000, 10_000) == _shape_sizes(probe_task("fashion_mnist", {"val_size": 5000}))
    assert torch.bincount(d.val.y).tolist() == [500] * 10
    # the same carve as the val_fraction that gives as many: 6,000 = 10% of 60,000
    a, b = build_task("fashion_mnist", {"val_size": 6000}, seed=2), build_task("fashion_mnist", {}, seed=2)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    with pytest.raises(ConfigError, match="val_size"):
        probe_task("fashion_mnist", {"val_size": 60_000})


def _synthetic(n: int = 1000, k: int = 5):
    from mergenet_core.data import Split

    ids = torch.arange(n)
    return Split(ids[:, None], ids % k), Split(ids[:200, None] + n, ids[:200] % k)


@pytest.mark.parametrize("opts", [{}, {"val_size": 100}, {"val_size": 999}, {"val_size": 1000},
                                  {"train_subset": 300}, {"train_subset": 300, "val_size": 700},
                                  {"train_subset": 300, "val_size": 701}, {"val_fraction": 0.3, "test_subset": 50},
                                  {"val_pool": 200, "val_size": 50}, {"val_pool": 200, "train_subset": 100}])
def test_split_sizes_agree_with_make_splits(opts):
    """Fast validation's sizes are make_splits' sizes, and both refuse the same options."""
    train, test = _synthetic()
    o = SplitOptions(**opts)
    try:
        got = make_splits(train, test, o, seed=3)
    except ConfigError as e:
        with pytest.raises(ConfigError) as again:
            split_sizes(len(train), len(test), o)
        assert again.value.field == e.field
        return
    assert tuple(len(s) for s in got) == split_sizes(len(train), len(test), o)
    tr, va = set(got[0].x[:, 0].tolist()), set(got[1].x[:, 0].tolist())
    assert not tr & va
