"""Image folders ("bring your own" images): the torchvision ImageFolder layout, decoded with
Pillow, held in memory or streamed from disk.

``root/train/<class>/*.png|jpg|...`` and optionally ``root/val/<class>/...`` and
``root/test/<class>/...`` (files in subfolders of a class folder count too); the classes are the
sorted subfolder names of ``train/`` and every split folder must have the same ones. Without
``test/`` a fixed-seed 20% test set is carved from ``train/`` (:func:`~.common.carve_test`). Each
image is converted to RGB (``channels: 3``) or grey (``channels: 1``), its shorter side resized to
``image_size`` (bilinear, antialiased) and centre-cropped to a square.

A split held in memory is uint8 ``[N, C, S, S]`` like every image task; a streamed split's ``x``
is an :class:`ImageFiles` (images by reference), decoded batch by batch by the ``DataLoader``
workers of :mod:`.stream`. The helpers here (:class:`ImageLoadOptions`, :func:`image_task`,
:func:`assemble_splits` / :func:`assemble_sizes` for data sets that ship their own validation
split) serve :mod:`.table`'s ``hf_images`` too.
"""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, model_validator

from ..errors import ConfigError, DataMissingError
from .base import TASKS, Split, TaskData, TaskInfo, TaskShape
from .common import (SALT_TEST_SUBSET, SALT_TRAIN_SUBSET, SALT_VAL, TEST_SEED, SplitOptions, carve_sizes,
                     carve_test, generator, make_splits, split_of, split_sizes, take_subset)
from .stream import iter_eval

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: mean/std (when not given) come from this many training images, drawn with a fixed seed
STATS_SAMPLE = 500
SALT_STATS = 6


# ---------------------------------------------------------------- decoding, images by reference

def _open(item):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):  # a datasets Image feature read with decode=False
        item = item.get("bytes") or item.get("path")
    return Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item)


def _name(item) -> str:
    if isinstance(item, dict):
        return str(item.get("path") or "an image of the data set")
    return str(item) if isinstance(item, (str, Path)) else "an image of the data set"


def decode_image(item, size: int, channels: int) -> np.ndarray:
    """One image (a path, ``bytes``, a ``{"bytes", "path"}`` mapping or a PIL image) as uint8
    ``[C, size, size]``: converted to RGB / grey, shorter side resized to ``size``, centre-cropped."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    try:
        img = _open(item)
        try:
            img.draft(mode, (size, size))  # JPEG: decode at a reduced scale still >= size
            w, h = img.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            out = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR, box=box)
        finally:
            if img is not item:
                img.close()
    except (OSError, ValueError, TypeError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DataMissingError(f"{_name(item)}: not a readable image ({type(e).__name__}: {str(e)[:80]})") from None
    arr = np.asarray(out, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


class ImageFiles:
    """Images by reference: ``items`` (file paths, or a row reader with ``fetch(ids)``) at the
    positions ``idx``, decoded to uint8 ``[N, C, S, S]`` only when asked. Indexing with a tensor,
    list or slice gives another view (what ``Split.take`` and the split helpers do), with an int
    one decoded image; :meth:`load` / ``.to(device)`` decode the view. ``workers``: how many
    ``DataLoader`` processes decode it ahead (:mod:`.stream`)."""

    lazy = True
    dtype = torch.uint8

    def __init__(self, items, size: int, channels: int, workers: int = 0, idx: torch.Tensor | None = None):
        self.items, self.size, self.channels, self.workers = items, int(size), int(channels), int(workers)
        self.idx = torch.arange(len(items)) if idx is None else torch.as_tensor(idx, dtype=torch.long)

    def __getitem__(self, k):
        sel = self.idx[k]
        if sel.dim() == 0:
            return ImageFiles(self.items, self.size, self.channels, 0, sel.reshape(1)).load()[0]
        return ImageFiles(self.items, self.size, self.channels, self.workers, sel)

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.channels, self.size, self.size)

    def dim(self) -> int:
        return 4

    def load(self) -> torch.Tensor:
        """The view's images, decoded: uint8 ``[N, C, S, S]``."""
        ids = self.idx.tolist()
        raw = self.items.fetch(ids) if hasattr(self.items, "fetch") else [self.items[i] for i in ids]
        out = np.empty(self.shape, dtype=np.uint8)
        for j, item in enumerate(raw):
            out[j] = decode_image(item, self.size, self.channels)
        return torch.from_numpy(out)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return self.load().to(device, non_blocking=non_blocking)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} images, {self.channels}x{self.size}x{self.size}, workers={self.workers})"


class HFImageRows:
    """The images of a ``datasets`` column (an ``Image`` feature: ``{"bytes", "path"}`` per row,
    or file paths), read without decoding: the ``items`` of an :class:`ImageFiles`."""

    def __init__(self, ds, column: str):
        self.ds, self.column = ds.select_columns([column]).with_format("arrow"), column

    def __len__(self) -> int:
        return len(self.ds)

    def fetch(self, ids: list[int]) -> list:
        return self.ds[ids][self.column].to_pylist() if ids else []

    def __getitem__(self, i: int):
        return self.fetch([int(i)])[0]


def decode_all(files: ImageFiles, batch: int = 256) -> torch.Tensor:
    """Every image of ``files`` decoded into one uint8 tensor (by its ``DataLoader`` workers)."""
    if len(files) == 0:
        return torch.empty(files.shape, dtype=torch.uint8)
    y = torch.zeros(len(files), dtype=torch.long)
    return torch.cat([x for x, _ in iter_eval(Split(files, y), batch)])


# ---------------------------------------------------------------- options and split assembly

def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


class ImageLoadOptions(BaseModel):
    """How images are decoded and held (``image_folder``, ``hf_images``)."""

    image_size: int = Field(32, ge=8, le=1024, description="shorter side resized to this, then centre-cropped "
                                                          "to a square")
    channels: Literal[1, 3] = Field(3, description="3: RGB; 1: grey (Pillow mode L)")
    mean: list[float] | None = Field(None, description="per-channel normalisation (with std); default: "
                                                       f"measured on {STATS_SAMPLE} training images")
    std: list[float] | None = None
    in_memory: Literal["auto"] | bool = Field("auto", description="decode every image of the run's splits into "
                                                                  "memory (auto: when they fit memory_mb), "
                                                                  "else stream them from disk")
    memory_mb: float = Field(2048, gt=0, description="in_memory auto: the most MiB of decoded pixels held")
    workers: int = Field(default_factory=_default_workers, ge=0, le=64,
                         description="DataLoader worker processes that decode (default: min(4, CPUs))")

    @model_validator(mode="after")
    def _check_stats(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (or neither)")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.channels:
                raise ValueError(f"{name} has {len(v)} values for {self.channels} channel(s)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError("std values must be > 0")
        return self


def use_given_val(val_from: str, present: bool, what: str) -> bool:
    """Whether validation is the data set's own split: ``auto`` when it exists, ``carve`` never,
    any other value (``folder``, ``file``, ``split``) always (missing: :class:`DataMissingError`)."""
    if val_from == "carve":
        return False
    if val_from != "auto" and not present:
        raise DataMissingError(f"val_from: {val_from} but there is no {what}")
    return present


def _given_val_checks(n_val: int, opts: SplitOptions) -> None:
    if opts.val_pool is not None:
        raise ConfigError("val_pool", "reserves training examples for validation, but validation is the data "
                                      "set's own split here: set val_from: carve to use val_pool")
    if opts.val_size is not None and opts.val_size > n_val:
        raise ConfigError("val_size", f"{opts.val_size} validation examples requested from a validation "
                                      f"split of {n_val}")


def carve(train: Split, test: Split | None) -> tuple[Split, Split]:
    """(train, test): the official test split, or a fixed-seed carve of train when there is none."""
    if test is not None:
        return train, test
    tr_idx, te_idx = carve_test(train.y)
    return split_of(train.x, train.y, tr_idx), split_of(train.x, train.y, te_idx)


def assemble_splits(train: Split, val: Split | None, test: Split, opts: SplitOptions,
                    seed: int) -> tuple[Split, Split, Split]:
    """The run's splits. Without a given ``val``: :func:`~.common.make_splits`. With one: train is
    ``train_subset`` of ``train`` (by seed), validation ``val_size`` of ``val`` (by seed; all of it
    without), test ``test_subset`` of ``test``; ``val_fraction`` is unused, ``val_pool`` refused."""
    if val is None:
        return make_splits(train, test, opts, seed)
    _given_val_checks(len(val), opts)
    tr_idx = take_subset(train.y, opts.train_subset, generator(seed, SALT_TRAIN_SUBSET))
    va_idx = take_subset(val.y, opts.val_size, generator(seed, SALT_VAL))
    te_idx = take_subset(test.y, opts.test_subset, generator(TEST_SEED, SALT_TEST_SUBSET))
    return split_of(train.x, train.y, tr_idx), split_of(val.x, val.y, va_idx), split_of(test.x, test.y, te_idx)


def assemble_sizes(n_train: int, n_val: int | None, n_test: int | None, opts: SplitOptions) -> tuple[int, int, int]:
    """(train, val, test) sizes of :func:`carve` then :func:`assemble_splits`, without the data."""
    if n_test is None:
        n_train, n_test = carve_sizes(n_train)
    if n_val is None:
        return split_sizes(n_train, n_test, opts)
    _given_val_checks(n_val, opts)
    pick = lambda n, k: n if k is None else min(k, n)  # noqa: E731
    return pick(n_train, opts.train_subset), pick(n_val, opts.val_size), pick(n_test, opts.test_subset)


# ---------------------------------------------------------------- image tasks

_STATS: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _stats(key: tuple, files: ImageFiles) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of ``x/255`` over a fixed sample of ``files`` (cached per ``key``)."""
    k = (*key, files.size, files.channels)
    if k not in _STATS:
        pick = torch.randperm(len(files), generator=generator(TEST_SEED, SALT_STATS))[:STATS_SAMPLE]
        x = decode_all(files[torch.sort(pick).values]).double().div_(255.0)
        std = [s if s > 0 else 1.0 for s in x.std((0, 2, 3)).tolist()]
        _STATS[k] = (tuple(x.mean((0, 2, 3)).tolist()), tuple(std))
    return _STATS[k]


def _fits(opts: ImageLoadOptions, n: int) -> bool:
    if opts.in_memory != "auto":
        return bool(opts.in_memory)
    return n * opts.channels * opts.image_size ** 2 <= opts.memory_mb * 2 ** 20


def image_task(name: str, official: tuple[Split, Split | None, Split], opts, seed: int, classes: list[str],
               description: str, key: tuple) -> TaskData:
    """An image task from its official (train, given val or None, test) splits of
    :class:`ImageFiles`: normalisation stats (``opts.mean``/``std``, else measured on the training
    split, cached per ``key``), the run's splits, decoded into memory when ``opts.in_memory`` says so."""
    train, val, test = official
    mean, std = (tuple(opts.mean), tuple(opts.std)) if opts.mean is not None else _stats(key, train.x)
    splits = assemble_splits(train, val, test, opts, seed)
    if _fits(opts, sum(len(s) for s in splits)):
        splits = tuple(Split(decode_all(s.x), s.y) for s in splits)
    info = TaskInfo(name=name, modality="image", num_classes=len(classes), in_channels=opts.channels,
                    image_size=opts.image_size, mean=mean, std=std, description=description)
    return TaskData(info, *splits, list(classes))


# ---------------------------------------------------------------- image_folder

class ImageFolderOptions(SplitOptions, ImageLoadOptions):
    """``root``: the folder holding ``train/`` (and optionally ``val/``, ``test/``), one subfolder
    per class. ``val_from``: ``folder`` = validation is ``val/`` (``auto``: when it exists; the
    split options then act as :func:`assemble_splits` says), ``carve`` = carved from the training
    images as every task does (``val/`` unused). ``title``: the data set's name in descriptions."""

    root: str = Field(..., description="folder with train/<class>/ images (and optionally val/, test/)")
    val_from: Literal["auto", "folder", "carve"] = "auto"
    title: str | None = None


def _class_dirs(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@lru_cache(maxsize=8)
def _listing(root: str) -> tuple[tuple[str, ...], dict[str, tuple[tuple[str, ...], tuple[int, ...]]]]:
    """(classes, {split: (paths, labels)}) of an image folder, for the split folders that exist."""
    base = Path(root).expanduser()
    if not (base / "train").is_dir():
        raise DataMissingError(f"image folder not found at {base}: expected {base}/train/<class>/<images> "
                               "(set task.options.root)")
    classes = _class_dirs(base / "train")
    if not classes:
        raise DataMissingError(f"{base}/train has no class folders (expected train/<class>/<images>)")
    sets = {}
    for split in ("train", "val", "test"):
        folder = base / split
        if not folder.is_dir():
            continue
        found = _class_dirs(folder)
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise DataMissingError(f"{folder}: its class folders differ from train/'s (missing: {missing[:5]}, "
                                   f"not in train/: {extra[:5]}); every split folder needs the same classes")
        paths, labels = [], []
        for k, c in enumerate(classes):
            files = _images_in(folder / c)
            if split == "train" and not files:
                raise DataMissingError(f"{folder / c}: no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += files
            labels += [k] * len(files)
        sets[split] = (tuple(paths), tuple(labels))
    return classes, sets


def _folder_layout(opts: ImageFolderOptions):
    root = str(Path(opts.root).expanduser().resolve())
    classes, sets = _listing(root)
    return root, classes, sets, use_given_val(opts.val_from, "val" in sets, f"{root}/val folder")


def probe_image_folder(opts: ImageFolderOptions) -> TaskShape:
    """Fast validation: the class folders are listed and their image files counted (none is decoded)."""
    _, classes, sets, use_val = _folder_layout(opts)
    n = {s: len(p) for s, (p, _) in sets.items()}
    info = TaskInfo(name="image_folder", modality="image", num_classes=len(classes), in_channels=opts.channels,
                    image_size=opts.image_size)
    return TaskShape(info, *assemble_sizes(n["train"], n.get("val") if use_val else None, n.get("test"), opts))


@TASKS.register("image_folder", options=ImageFolderOptions, modality="image", probe=probe_image_folder,
                title="image folder")
def load_image_folder(opts: ImageFolderOptions, seed: int) -> TaskData:
    """Images in class folders (torchvision ImageFolder layout); test carved when there is no test/."""
    root, classes, sets, use_val = _folder_layout(opts)
    s, c = opts.image_size, opts.channels

    def split(name: str) -> Split:
        paths, labels = sets[name]
        return Split(ImageFiles(paths, s, c, opts.workers), torch.tensor(labels, dtype=torch.int64))

    train, test = carve(split("train"), split("test") if "test" in sets else None)
    desc = (f"{opts.title or 'image folder'} ({Path(root).name}; {s}x{s} {'RGB' if c == 3 else 'grey'}"
            f"{'' if 'test' in sets else '; fixed 20% test carve'})")
    return image_task("image_folder", (train, split("val") if use_val else None, test), opts, seed,
                      list(classes), desc, ("folder", root))
