"""Tables and Hugging Face data sets ("bring your own" data): ``text_table``, ``hf_text``,
``hf_images``.

``text_table`` reads ``train.csv|jsonl|parquet`` (and optionally ``val.*`` / ``validation.*``,
``test.*``) from a folder with pyarrow, or one file whose test split is carved with a fixed seed.
``hf_text`` / ``hf_images`` read a data set written by ``datasets.save_to_disk`` (a
``DatasetDict`` with a train and optionally a validation and a test split; a plain ``Dataset`` is
its train split). A ``TASKS`` entry has one modality, so the text and the image kind are two
tasks. Rows whose text, image or label is null are dropped.

Classes: ``labels`` (fixing their order), else a ``ClassLabel`` feature's names, else integer
labels are the class numbers themselves (``0..max``), else the sorted distinct labels of the
training split. Texts are tokenised once per process with ``tokenizer`` (a local Hugging Face
tokenizer folder; default the bundled MiniLM tokenizer) to int64 ``[N, max_length]``; images are
decoded as :mod:`.folder` decodes them (in memory or streamed).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from ..errors import DataMissingError
from .base import TASKS, Split, TaskData, TaskInfo, TaskShape
from .common import SplitOptions
from .text import get_tokenizer, minilm_path, tokenizer_vocab_size
from .folder import (HFImageRows, ImageFiles, ImageLoadOptions, assemble_sizes, assemble_splits, carve, image_task,
                     use_given_val)

TABLE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
SPLIT_FILES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


# ---------------------------------------------------------------- labels and tokens

class TextFields(BaseModel):
    """Columns, classes and tokenisation of a text data set."""

    text_column: str = "text"
    label_column: str = "label"
    labels: list[str | int] | None = Field(None, min_length=2, description="the classes, in order (default: "
                                                                           "sorted distinct training labels)")
    max_length: int = Field(64, ge=8, le=512)
    tokenizer: str | None = Field(None, description="a local Hugging Face tokenizer folder (default: MiniLM)")
    title: str | None = None


def _key(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def class_names(train_labels: list, given: list | None) -> list[str]:
    """The class names, in class-number order (see the module docstring)."""
    if given is not None:
        names = [_key(v) for v in given]
        if len(set(names)) != len(names):
            raise DataMissingError(f"labels lists a class twice: {names}")
        return names
    if not train_labels:
        raise DataMissingError("the training split has no labelled rows")
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in train_labels)
    if ints and min(train_labels) >= 0:
        return [str(k) for k in range(max(train_labels) + 1)]
    return sorted({_key(v) for v in train_labels})


def encode_labels(values: list, names: list[str], where: str, numbered: bool = False) -> torch.Tensor:
    """Class numbers of ``values`` (``numbered``: the values are class numbers already, as a
    ``ClassLabel`` feature's are)."""
    index = {n: k for k, n in enumerate(names)} if not numbered else {str(k): k for k in range(len(names))}
    keys = [_key(v) for v in values]
    unknown = sorted({k for k in keys if k not in index})
    if unknown:
        raise DataMissingError(f"{where}: labels {unknown[:3]} are not among the {len(names)} classes "
                               f"{names[:5]} (set task.options.labels)")
    return torch.tensor([index[k] for k in keys], dtype=torch.int64)


def _tokenizer_folder(opts: TextFields) -> str:
    if opts.tokenizer is None:
        return str(minilm_path())
    path = Path(opts.tokenizer).expanduser()
    if not path.is_dir():
        raise DataMissingError(f"tokenizer folder not found: {path} (a local Hugging Face tokenizer folder)")
    return str(path.resolve())


@lru_cache(maxsize=8)
def _encode(texts: tuple[str, ...], folder: str, max_length: int) -> dict[str, torch.Tensor]:
    """``texts`` tokenised to int64 ``[N, max_length]`` (cached per process)."""
    if not texts:
        empty = torch.zeros((0, max_length), dtype=torch.int64)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    cut = 16 * max_length  # truncation keeps max_length tokens: a token spans far fewer characters
    enc = get_tokenizer(folder)([" ".join(t.split())[:cut] for t in texts], padding="max_length",
                                truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


Rows = tuple[tuple[str, ...], tuple]  # (texts, labels)


def _text_shape(name: str, rows: dict[str, Rows | None], names: list[str], opts, numbered: bool) -> TaskShape:
    """Fast validation of a text data set from its rows (labels checked, nothing tokenised)."""
    for split, r in rows.items():
        if r is not None:
            encode_labels(list(r[1]), names, f"{name} {split} split", numbered)
    info = TaskInfo(name=name, modality="text", num_classes=len(names), max_length=opts.max_length,
                    vocab_size=tokenizer_vocab_size(_tokenizer_folder(opts)))
    n = {s: None if r is None else len(r[0]) for s, r in rows.items()}
    return TaskShape(info, *assemble_sizes(n["train"], n["val"], n["test"], opts))


def _text_task(name: str, rows: dict[str, Rows | None], names: list[str], opts, seed: int,
               description: str, numbered: bool = False) -> TaskData:
    """A text task from its official splits' rows (``val`` None: carved; ``test`` None: fixed carve)."""
    folder = _tokenizer_folder(opts)

    def split(s: str) -> Split | None:
        r = rows[s]
        if r is None:
            return None
        y = encode_labels(list(r[1]), names, f"{name} {s} split", numbered)
        return Split(_encode(r[0], folder, opts.max_length), y)

    train, test = carve(split("train"), split("test"))
    train, val, test = assemble_splits(train, split("val"), test, opts, seed)
    tok = get_tokenizer(folder)
    info = TaskInfo(name=name, modality="text", num_classes=len(names), max_length=opts.max_length,
                    vocab_size=max(int(tok.vocab_size), len(tok)), description=description)
    return TaskData(info, train, val, test, list(names))


# ---------------------------------------------------------------- text_table

class TextTableOptions(SplitOptions, TextFields):
    """``root``: a folder holding ``train.csv|jsonl|parquet`` (and optionally ``val.*`` or
    ``validation.*``, ``test.*``), or one such file (its test split carved with a fixed seed).
    ``val_from``: ``file`` = validation is the val file (``auto``: when there is one), ``carve`` =
    carved from train as every task does."""

    root: str = Field(..., description="a folder with train.csv|jsonl|parquet (val.*, test.*), or one file")
    val_from: Literal["auto", "file", "carve"] = "auto"


def _table_files(root: str) -> dict[str, Path | None]:
    base = Path(root).expanduser()
    if base.is_file():
        if base.suffix.lower() not in TABLE_EXTENSIONS:
            raise DataMissingError(f"{base}: not a table file ({', '.join(TABLE_EXTENSIONS)})")
        return {"train": base, "val": None, "test": None}
    if not base.is_dir():
        raise DataMissingError(f"text table not found at {base} (set task.options.root)")
    out = {}
    for split, stems in SPLIT_FILES.items():
        found = [base / f"{s}{e}" for s in stems for e in TABLE_EXTENSIONS if (base / f"{s}{e}").is_file()]
        if len(found) > 1:
            raise DataMissingError(f"{base}: several {split} tables ({', '.join(p.name for p in found)}); keep one")
        out[split] = found[0] if found else None
    if out["train"] is None:
        raise DataMissingError(f"{base} holds no train table (train.csv, train.jsonl or train.parquet)")
    return out


def _read_table(path: Path, text_column: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    ext = path.suffix.lower()
    try:
        if ext == ".parquet":
            return pq.read_table(path)
        if ext == ".csv":
            return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={text_column: pa.string()}))
        return pajson.read_json(path)
    except (pa.ArrowException, OSError) as e:
        raise DataMissingError(f"{path}: not a readable table ({type(e).__name__}: {str(e)[:80]})") from None


@lru_cache(maxsize=8)
def _table_rows(path: str, text_column: str, label_column: str) -> Rows:
    """(texts, labels) of one table file, rows with a null text or label dropped."""
    table = _read_table(Path(path), text_column)
    missing = [c for c in (text_column, label_column) if c not in table.column_names]
    if missing:
        raise DataMissingError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names[:10])}; "
                               "set task.options.text_column / label_column)")
    return _rows(table.column(text_column).to_pylist(), table.column(label_column).to_pylist())


def _rows(texts: list, labels: list) -> Rows:
    keep = [i for i, (t, v) in enumerate(zip(texts, labels)) if t is not None and v is not None]
    return tuple(str(texts[i]) for i in keep), tuple(labels[i] for i in keep)


def _table_layout(opts: TextTableOptions) -> tuple[dict[str, Rows | None], list[str]]:
    files = _table_files(opts.root)
    if not use_given_val(opts.val_from, files["val"] is not None, f"val table in {opts.root}"):
        files["val"] = None
    rows = {s: None if p is None else _table_rows(str(p.resolve()), opts.text_column, opts.label_column)
            for s, p in files.items()}
    return rows, class_names(list(rows["train"][1]), opts.labels)


def probe_text_table(opts: TextTableOptions) -> TaskShape:
    """Fast validation: the tables are read (pyarrow) and their rows and labels checked; nothing
    is tokenised."""
    rows, names = _table_layout(opts)
    return _text_shape("text_table", rows, names, opts, numbered=False)


@TASKS.register("text_table", options=TextTableOptions, modality="text", probe=probe_text_table,
                title="text table")
def load_text_table(opts: TextTableOptions, seed: int) -> TaskData:
    """Texts and labels from CSV / JSON Lines / Parquet tables; test carved when there is no test table."""
    rows, names = _table_layout(opts)
    carved = "" if rows["test"] is not None else "; fixed 20% test carve"
    desc = f"{opts.title or 'text table'} ({Path(opts.root).name}{carved})"
    return _text_task("text_table", rows, names, opts, seed, desc)


# ---------------------------------------------------------------- hf_text / hf_images

HF_ROOT = Field(..., description="a folder written by datasets.save_to_disk")


class HFSplits(BaseModel):
    """Which splits of a ``save_to_disk`` folder are which (a missing test split is carved)."""

    root: str = HF_ROOT
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "test"
    val_from: Literal["auto", "split", "carve"] = "auto"


@lru_cache(maxsize=4)
def _load_hf(root: str) -> dict:
    try:
        import datasets
    except ImportError:
        raise DataMissingError("hf_text / hf_images need the datasets package: pip install 'mergenet[hf]'") from None
    try:
        d = datasets.load_from_disk(root)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise DataMissingError(f"no data set saved with save_to_disk at {root} ({type(e).__name__})") from None
    return {"train": d} if isinstance(d, datasets.Dataset) else dict(d)


def _hf_splits(opts: HFSplits, columns: list[str]) -> dict:
    """{train, val, test: a datasets.Dataset or None} with ``columns`` checked."""
    root = str(Path(opts.root).expanduser().resolve())
    d = _load_hf(root)
    if opts.train_split not in d:
        raise DataMissingError(f"{root} has no split {opts.train_split!r} (splits: {', '.join(d)}; set train_split)")
    out = {"train": d[opts.train_split], "test": d.get(opts.test_split)}
    out["val"] = d.get(opts.val_split) if use_given_val(opts.val_from, opts.val_split in d,
                                                         f"split {opts.val_split!r} in {root}") else None
    for s, ds in out.items():
        missing = [c for c in columns if ds is not None and c not in ds.column_names]
        if missing:
            raise DataMissingError(f"{root} {s} split: no column {missing[0]!r} (columns: "
                                   f"{', '.join(ds.column_names[:10])})")
    return out


def _hf_column(ds, column: str, numbered: bool = False):
    """A column's values (``numbered``: a ``ClassLabel`` column, its -1 "no label" read as null)."""
    values = ds.select_columns([column]).with_format("arrow")[:][column].to_pylist()
    return [None if v == -1 else v for v in values] if numbered else values


def _hf_classes(ds, opts) -> tuple[list[str], bool]:
    """(class names, whether the label values are class numbers: a ``ClassLabel`` feature)."""
    feature = ds.features[opts.label_column]
    names = getattr(feature, "names", None)
    if names and opts.labels is None:
        return list(names), True
    return class_names(_hf_column(ds, opts.label_column), opts.labels), False


class HFTextOptions(SplitOptions, TextFields, HFSplits):
    """``root`` and the split names (:class:`HFSplits`), the text and label columns and the
    tokenisation (:class:`TextFields`)."""

    root: str = HF_ROOT


def _hf_text_layout(opts: HFTextOptions) -> tuple[dict[str, Rows | None], list[str], bool]:
    sets = _hf_splits(opts, [opts.text_column, opts.label_column])
    names, numbered = _hf_classes(sets["train"], opts)
    rows = {s: None if ds is None else _rows(_hf_column(ds, opts.text_column),
                                             _hf_column(ds, opts.label_column, numbered)) for s, ds in sets.items()}
    return rows, names, numbered


def probe_hf_text(opts: HFTextOptions) -> TaskShape:
    """Fast validation: the splits and columns are there (memory-mapped) and the labels known;
    nothing is tokenised."""
    rows, names, numbered = _hf_text_layout(opts)
    return _text_shape("hf_text", rows, names, opts, numbered)


@TASKS.register("hf_text", options=HFTextOptions, modality="text", probe=probe_hf_text,
                title="Hugging Face data set (text)")
def load_hf_text(opts: HFTextOptions, seed: int) -> TaskData:
    """A text classification set saved with ``datasets.save_to_disk``."""
    rows, names, numbered = _hf_text_layout(opts)
    desc = f"{opts.title or 'Hugging Face data set'} ({Path(opts.root).name})"
    return _text_task("hf_text", rows, names, opts, seed, desc, numbered)


class HFImageOptions(SplitOptions, ImageLoadOptions, HFSplits):
    """``root`` and the split names (:class:`HFSplits`), ``image_column`` (an ``Image`` feature or
    file paths), ``label_column``, ``labels`` and the decoding (:class:`ImageLoadOptions`)."""

    root: str = HF_ROOT
    image_column: str = "image"
    label_column: str = "label"
    labels: list[str | int] | None = Field(None, min_length=2)
    title: str | None = None


def _hf_image_layout(opts: HFImageOptions) -> tuple[dict[str, Split | None], list[str]]:
    sets = _hf_splits(opts, [opts.image_column, opts.label_column])
    names, numbered = _hf_classes(sets["train"], opts)
    out = {}
    for s, ds in sets.items():
        if ds is None:
            out[s] = None
            continue
        labels, images = _hf_column(ds, opts.label_column, numbered), HFImageRows(ds, opts.image_column)
        present = images.ds[:][opts.image_column].is_valid().to_pylist()
        keep = [i for i, (ok, v) in enumerate(zip(present, labels)) if ok and v is not None]
        x = ImageFiles(images, opts.image_size, opts.channels, opts.workers, torch.tensor(keep, dtype=torch.long))
        out[s] = Split(x, encode_labels([labels[i] for i in keep], names, f"hf_images {s} split", numbered))
    return out, names


def probe_hf_images(opts: HFImageOptions) -> TaskShape:
    """Fast validation: the splits and columns are there and the labels known; no image is decoded."""
    sets, names = _hf_image_layout(opts)
    info = TaskInfo(name="hf_images", modality="image", num_classes=len(names), in_channels=opts.channels,
                    image_size=opts.image_size)
    n = {s: None if v is None else len(v) for s, v in sets.items()}
    return TaskShape(info, *assemble_sizes(n["train"], n["val"], n["test"], opts))


@TASKS.register("hf_images", options=HFImageOptions, modality="image", probe=probe_hf_images,
                title="Hugging Face data set (images)")
def load_hf_images(opts: HFImageOptions, seed: int) -> TaskData:
    """An image classification set saved with ``datasets.save_to_disk``, decoded as image folders are."""
    sets, names = _hf_image_layout(opts)
    train, test = carve(sets["train"], sets["test"])
    root = str(Path(opts.root).expanduser().resolve())
    s, c = opts.image_size, opts.channels
    desc = f"{opts.title or 'Hugging Face data set'} ({Path(root).name}; {s}x{s} {'RGB' if c == 3 else 'grey'})"
    return image_task("hf_images", (train, sets["val"], test), opts, seed, names, desc,
                      ("hf", root, opts.train_split, opts.image_column))
