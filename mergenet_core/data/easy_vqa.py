"""easy-VQA (PyPI ``easy-vqa==1.0``, MIT): rendered-shape images, templated questions.

The package holds 4,000 train + 1,000 test RGB 64x64 PNG images, each one shape (circle,
rectangle, triangle) in one of eight colours on a light background, and 38,575 + 9,673
templated questions with 13 answers (the shapes, the colours, yes, no). It is read as files
from the installed package; the package is never imported. This is *not* VQA v2.0 or MSCOCO:
the images are rendered shapes and every question and caption is a template.

Three tasks read it:

* ``easy_vqa``: visual question answering. An example is one question; its input is the
  question's image and tokens (modality ``image_question``), its label one of the 13 answers.
  Validation questions are drawn from the training questions, so they share images with
  training questions (the official test set is 1,000 images the training never sees).
* ``easy_vqa_captions``: image-text retrieval (modality ``image_caption``). An example is one
  image and its caption, a template filled with attributes *read from the pixels* (shape from
  how much of its bounding box the shape fills, colour as the nearest of the eight palette
  colours, size from the bounding box, position from the centroid in a 3x3 grid), e.g.
  "a small red circle at the top left". The attributes agree with every question's answer
  (``tests/test_easy_vqa.py``). Several images share a caption; the label is the caption's
  index among all distinct captions (``class_names``), which the retrieval loss and metrics
  use to count every image of a caption as a match.
* ``easy_vqa_shapes``: image classification of the same images (``label``: shape, colour,
  or shape and colour, 24 classes), the shipped way to train a CNN whose layers the VQA model's
  image tower can take (``transplant`` / ``init_from``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import DataMissingError
from .base import TASKS, Split, TaskData, TaskInfo, TaskShape
from .common import SplitOptions, make_splits, package_dir, split_sizes

INSTALL = "pip install --no-deps easy-vqa==1.0"
SHAPES = ("circle", "rectangle", "triangle")
#: the generator's palette (RGB), as the images hold it
COLORS = {"black": (0, 0, 0), "blue": (0, 0, 255), "brown": (165, 42, 42), "gray": (128, 128, 128),
          "green": (0, 255, 0), "red": (255, 0, 0), "teal": (0, 128, 128), "yellow": (255, 255, 0)}
SIZES = ("small", "medium", "large")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
IMAGE_SIZE = 64
#: official counts (fast validation checks the files, not their contents)
N_IMAGES = {"train": 4000, "test": 1000}


def _folder(root: str | None) -> Path:
    base = Path(root) if root else package_dir("easy_vqa", "easy-VQA", INSTALL) / "data"
    for split in ("train", "test"):
        if not (base / split / "questions.json").is_file() or not (base / split / "images").is_dir():
            raise DataMissingError(f"easy-VQA not found at {base} (no {split}/questions.json or {split}/images): "
                                   f"{INSTALL}, or set task.options.root")
    if not (base / "answers.txt").is_file():
        raise DataMissingError(f"easy-VQA at {base} has no answers.txt: reinstall ({INSTALL})")
    return base


def _image_count(base: Path, split: str) -> int:
    return sum(1 for p in (base / split / "images").iterdir() if p.suffix == ".png")


@lru_cache(maxsize=2)
def _answers(folder: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in (Path(folder) / "answers.txt").read_text().splitlines() if a.strip())


@lru_cache(maxsize=4)
def _images(folder: str, split: str) -> torch.Tensor:
    """The split's images as uint8 ``[N, 3, 64, 64]``, row ``i`` = ``images/i.png`` (cached)."""
    from PIL import Image

    base = Path(folder) / split / "images"
    n = _image_count(Path(folder), split)
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        path = base / f"{i}.png"
        if not path.is_file():
            raise DataMissingError(f"easy-VQA: {path} is missing (image ids must be 0..{n - 1}); reinstall")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise DataMissingError(f"easy-VQA: {path} is {arr.shape}, expected 64x64 RGB")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


@lru_cache(maxsize=4)
def _questions(folder: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
    """(texts, answers, image ids) of the split's ``questions.json``."""
    path = Path(folder) / split / "questions.json"
    try:
        rows = json.loads(path.read_text())
        texts, answers, ids = zip(*((str(q), str(a), int(i)) for q, a, i in rows))
    except (OSError, ValueError, TypeError) as e:
        raise DataMissingError(f"{path}: not an easy-VQA question file ({type(e).__name__})") from None
    return texts, answers, ids


def read_attributes(images: torch.Tensor) -> list[dict[str, str]]:
    """Shape, colour, size and position of the one shape in each uint8 ``[N, 3, H, W]`` image,
    read from its pixels: the shape is every pixel further than 60 (summed over RGB) from the
    background (the most common border pixel); its colour the palette colour nearest the median
    of its quarter of pixels furthest from the background (edges are anti-aliased); its
    kind from the fraction of its bounding box it fills (rectangle > 0.92 > circle > 0.7 >
    triangle: small shapes' anti-aliased edges blur this, see :func:`_attributes`); its size from the longer side of the box (< 20 px small, < 34 medium, else large);
    its position from its centroid in a 3x3 grid."""
    x = images.numpy().astype(np.int32)
    palette = np.array(list(COLORS.values()))
    names = list(COLORS)
    out = []
    h, w = x.shape[2], x.shape[3]
    for img in x:
        border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], axis=1).T
        vals, counts = np.unique(border, axis=0, return_counts=True)
        bg = vals[counts.argmax()]
        dist = np.abs(img - bg[:, None, None]).sum(0)
        mask = dist > 60
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            raise DataMissingError("easy-VQA: an image without a shape (no pixel differs from the background)")
        hh, ww = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = len(ys) / (hh * ww)
        shape = "triangle" if fill < 0.7 else "rectangle" if fill > 0.92 else "circle"
        core = mask & (dist >= np.percentile(dist[mask], 75))
        colour = names[int(np.abs(palette - np.median(img[:, core], axis=1)).sum(1).argmin())]
        side = max(hh, ww)
        size = "small" if side < 20 else "medium" if side < 34 else "large"
        row, col = ROWS[min(2, int(3 * ys.mean() / h))], COLS[min(2, int(3 * xs.mean() / w))]
        out.append({"shape": shape, "color": colour, "size": size, "row": row, "col": col})
    return out


def caption(a: dict[str, str]) -> str:
    """The templated caption of one image's attributes."""
    where = "center" if (a["row"], a["col"]) == ("middle", "center") else f"{a['row']} {a['col']}"
    return f"a {a['size']} {a['color']} {a['shape']} at the {where}"


def question_facts(texts, answers, ids) -> dict[int, dict[str, str]]:
    """The shape and colour of each image where its questions determine them: stated by a
    "what ..." question or answer or a yes/no answer, or the one left when the others are ruled out."""
    words = {w: ("shape", SHAPES) for w in SHAPES} | {w: ("color", tuple(COLORS)) for w in COLORS}
    has: dict[int, dict[str, str]] = {}
    ruled_out: dict[int, dict[str, set]] = {}
    for t, a, i in zip(texts, answers, ids):
        w = next((w for w in (*SHAPES, *COLORS) if f" {w}" in t), None)
        if a in words:  # "what shape / colour ...", "what colour is the <shape>?", "what is the <colour> shape?"
            has.setdefault(i, {})[words[a][0]] = a
            if w is not None:
                has[i][words[w][0]] = w
            continue
        kind = words[w][0]
        present = (a == "yes") != (" not " in t or t.startswith("is no "))
        if present:
            has.setdefault(i, {})[kind] = w
        else:
            ruled_out.setdefault(i, {}).setdefault(kind, set()).add(w)
    for i, kinds in ruled_out.items():
        for kind, out in kinds.items():
            left = [w for w in (SHAPES if kind == "shape" else COLORS) if w not in out]
            if len(left) == 1:
                has.setdefault(i, {}).setdefault(kind, left[0])
    return has


@lru_cache(maxsize=2)
def _attributes(folder: str) -> dict[str, list[dict[str, str]]]:
    """Every image's attributes: read from the pixels (:func:`read_attributes`), with the shape
    and colour its questions determine taking precedence (the pixel rule disagrees with the
    questions on 1 of the 5,000 images, an anti-aliased small rectangle read as a circle; the
    questions leave the shape of 209 and the colour of 366 of the 5,000 images to the pixels)."""
    out = {}
    for s in ("train", "test"):
        attrs = read_attributes(_images(folder, s))
        for i, facts in question_facts(*_questions(folder, s)).items():
            attrs[i].update(facts)
        out[s] = attrs
    return out


# ---------------------------------------------------------------- tokens

def _tokenise(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    from .text import get_tokenizer

    enc = get_tokenizer()(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def _text_info(name: str, modality: str, classes: int, opts, description: str = "",
               stats: tuple = ((), ())) -> TaskInfo:
    from .text import tokenizer_vocab_size

    return TaskInfo(name=name, modality=modality, num_classes=classes, in_channels=3, image_size=IMAGE_SIZE,
                    max_length=opts.max_length, vocab_size=tokenizer_vocab_size(), mean=stats[0], std=stats[1],
                    description=description)


def _stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    v = x.float().div(255.0)
    return tuple(v.mean((0, 2, 3)).tolist()), tuple(v.std((0, 2, 3)).tolist())


class IndexedImages:
    """Images by reference: rows ``idx`` of a shared uint8 bank ``[M, C, H, W]``, so the 38,575
    questions of easy-VQA need not each hold a copy of their image. Indexing gives another view;
    ``.to(device)`` gives the images themselves (what :class:`~.modality.Image` prepares)."""

    def __init__(self, bank: torch.Tensor, idx: torch.Tensor):
        self.bank, self.idx = bank, idx

    def __getitem__(self, k) -> "IndexedImages":
        return IndexedImages(self.bank, self.idx[k])

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.bank.shape[1:])

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return self.bank[self.idx].to(device, non_blocking=non_blocking)


# ---------------------------------------------------------------- easy_vqa (VQA)

class EasyVQAOptions(SplitOptions):
    """``root``: the folder holding ``train/``, ``test/`` and ``answers.txt`` (default: the
    installed package's ``easy_vqa/data``). ``max_length``: question tokens (they are short)."""

    max_length: int = Field(16, ge=8, le=64)


def probe_easy_vqa(opts: EasyVQAOptions) -> TaskShape:
    """Fast validation: the files are there; the split sizes from the question files (read,
    about 50 ms); no image is decoded, nothing tokenised."""
    base = _folder(opts.root)
    n_tr, n_te = (len(_questions(str(base), s)[0]) for s in ("train", "test"))
    info = _text_info("easy_vqa", "image_question", len(_answers(str(base))), opts)
    return TaskShape(info, *split_sizes(n_tr, n_te, opts))


@lru_cache(maxsize=4)
def _vqa_split(folder: str, split: str, max_length: int) -> Split:
    texts, answers, ids = _questions(folder, split)
    index = {a: k for k, a in enumerate(_answers(folder))}
    unknown = sorted(set(answers) - set(index))
    if unknown:
        raise DataMissingError(f"easy-VQA {split}/questions.json has answers outside answers.txt: {unknown[:3]}")
    x = {"image": IndexedImages(_images(folder, split), torch.tensor(ids, dtype=torch.int64)),
         **_tokenise(list(texts), max_length)}
    return Split(x, torch.tensor([index[a] for a in answers], dtype=torch.int64))


@TASKS.register("easy_vqa", options=EasyVQAOptions, modality="image_question", probe=probe_easy_vqa,
                title="easy-VQA (rendered shapes, templated questions)")
def load_easy_vqa(opts: EasyVQAOptions, seed: int) -> TaskData:
    """easy-VQA questions about 64x64 rendered-shape images, 13 answers (38,575 + 9,673)."""
    folder = str(_folder(opts.root))
    full_tr, full_te = (_vqa_split(folder, s, opts.max_length) for s in ("train", "test"))
    train, val, test = make_splits(full_tr, full_te, opts, seed)
    info = _text_info("easy_vqa", "image_question", len(_answers(folder)), opts,
                      "easy-VQA (offline; rendered shapes, templated questions, not VQA v2)",
                      _stats(_images(folder, "train")))
    return TaskData(info, train, val, test, list(_answers(folder)))


# ---------------------------------------------------------------- easy_vqa_captions (retrieval)

class CaptionOptions(SplitOptions):
    max_length: int = Field(16, ge=8, le=64)


@lru_cache(maxsize=2)
def _captions(folder: str) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """(distinct captions, sorted; each split's caption index per image)."""
    attrs = _attributes(folder)
    per = {s: [caption(a) for a in attrs[s]] for s in ("train", "test")}
    names = tuple(sorted(set(per["train"]) | set(per["test"])))
    index = {c: k for k, c in enumerate(names)}
    return names, {s: tuple(index[c] for c in per[s]) for s in per}


def probe_easy_vqa_captions(opts: CaptionOptions) -> TaskShape:
    """Fast validation: the files are there and the image counts (listed, not decoded); the
    number of distinct captions is not known without reading the pixels, so the stand-in
    ``num_classes`` is 0 (the retrieval model does not depend on it)."""
    base = _folder(opts.root)
    n_tr, n_te = (_image_count(base, s) for s in ("train", "test"))
    info = _text_info("easy_vqa_captions", "image_caption", 0, opts)
    return TaskShape(info, *split_sizes(n_tr, n_te, opts))


@TASKS.register("easy_vqa_captions", options=CaptionOptions, modality="image_caption",
                probe=probe_easy_vqa_captions, title="easy-VQA captions (rendered shapes, templated captions)")
def load_easy_vqa_captions(opts: CaptionOptions, seed: int) -> TaskData:
    """Image-caption pairs: each easy-VQA image with its templated caption (4,000 + 1,000)."""
    folder = str(_folder(opts.root))
    names, ids = _captions(folder)
    tokens = _tokenise(list(names), opts.max_length)
    full = {}
    for s in ("train", "test"):
        y = torch.tensor(ids[s], dtype=torch.int64)
        full[s] = Split({"image": _images(folder, s), **{k: v[y] for k, v in tokens.items()}}, y)
    train, val, test = make_splits(full["train"], full["test"], opts, seed)
    info = _text_info("easy_vqa_captions", "image_caption", len(names), opts,
                      "easy-VQA captions (offline; rendered shapes, templated captions, not MSCOCO)",
                      _stats(_images(folder, "train")))
    return TaskData(info, train, val, test, list(names))


# ---------------------------------------------------------------- easy_vqa_shapes (image classes)

class ShapesOptions(SplitOptions):
    """``label``: what the class is: the shape (3), the colour (8), or both (24)."""

    label: Literal["shape", "color", "shape_color"] = "shape_color"


def _classes(label: str) -> list[str]:
    if label == "shape":
        return list(SHAPES)
    if label == "color":
        return list(COLORS)
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def probe_easy_vqa_shapes(opts: ShapesOptions) -> TaskShape:
    base = _folder(opts.root)
    n_tr, n_te = (_image_count(base, s) for s in ("train", "test"))
    info = TaskInfo(name="easy_vqa_shapes", modality="image", num_classes=len(_classes(opts.label)),
                    in_channels=3, image_size=IMAGE_SIZE)
    return TaskShape(info, *split_sizes(n_tr, n_te, opts))


@TASKS.register("easy_vqa_shapes", options=ShapesOptions, modality="image", probe=probe_easy_vqa_shapes,
                title="easy-VQA shapes (rendered shapes classified by shape / colour)")
def load_easy_vqa_shapes(opts: ShapesOptions, seed: int) -> TaskData:
    """The easy-VQA images labelled by their shape and/or colour (read from the pixels)."""
    folder = str(_folder(opts.root))
    classes = _classes(opts.label)
    index = {c: k for k, c in enumerate(classes)}
    key = {"shape": lambda a: a["shape"], "color": lambda a: a["color"],
           "shape_color": lambda a: f"{a['color']} {a['shape']}"}[opts.label]
    full = {s: Split(_images(folder, s), torch.tensor([index[key(a)] for a in _attributes(folder)[s]],
                                                      dtype=torch.int64)) for s in ("train", "test")}
    train, val, test = make_splits(full["train"], full["test"], opts, seed)
    info = TaskInfo(name="easy_vqa_shapes", modality="image", num_classes=len(classes), in_channels=3,
                    image_size=IMAGE_SIZE, mean=_stats(_images(folder, "train"))[0],
                    std=_stats(_images(folder, "train"))[1],
                    description=f"easy-VQA images by {opts.label.replace('_', ' and ')} (offline; rendered shapes)")
    return TaskData(info, train, val, test, classes)
