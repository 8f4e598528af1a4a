"""Image tasks: Fashion-MNIST (offline, IDX files) and CIFAR-10/100 (python-pickle folders).

Images are kept as uint8 ``[N, C, H, W]``; :func:`prepare_images` normalises per batch.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import DataMissingError
from .base import TASKS, Split, TaskData, TaskInfo, TaskShape
from .common import SplitOptions, make_splits, split_sizes

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


# ---------------------------------------------------------------- Fashion-MNIST

class FashionMNISTOptions(SplitOptions):
    """``image_size`` > 28 zero-pads (32 is the CIFAR-shape stand-in); ``channels=3`` repeats grey."""

    image_size: int = Field(28, ge=28, le=64)
    channels: Literal[1, 3] = 1


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one gzip'd IDX file (big-endian header: magic, dims...) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataMissingError(f"{path} is not an IDX file of the expected kind (magic {found:#x}, want {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataMissingError(f"{path} is truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


FMNIST_FILES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


def _fmnist_files(root: str) -> list[Path]:
    base = Path(root)
    if not all((base / n).is_file() for n in FMNIST_FILES):
        raise DataMissingError(
            f"Fashion-MNIST not found at {base}: apt-get install dataset-fashion-mnist, or set task.options.root")
    return [base / n for n in FMNIST_FILES]


def idx_count(path: Path, magic: int) -> int:
    """The item count in an IDX file's header (only the header is decompressed)."""
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(8)
    except (OSError, EOFError) as e:
        raise DataMissingError(f"{path}: not readable ({type(e).__name__}: {str(e)[:80]})") from None
    found = int.from_bytes(head[:4], "big")
    if len(head) < 8 or found != magic:
        raise DataMissingError(f"{path} is not an IDX file of the expected kind (magic {found:#x}, want {magic:#x})")
    return int.from_bytes(head[4:8], "big")


def probe_fashion_mnist(opts: "FashionMNISTOptions") -> TaskShape:
    """Fast validation: the four files are there and their IDX headers agree (no pixel is read)."""
    xtr, ytr, xte, yte = _fmnist_files(opts.root or FMNIST_ROOT)
    base = xtr.parent
    n_tr, n_te = idx_count(xtr, 0x803), idx_count(xte, 0x803)
    if n_tr != idx_count(ytr, 0x801) or n_te != idx_count(yte, 0x801):
        raise DataMissingError(f"Fashion-MNIST at {base}: image and label counts differ")
    info = TaskInfo(name="fashion_mnist", modality="image", num_classes=10, in_channels=opts.channels,
                    image_size=opts.image_size)
    return TaskShape(info, *split_sizes(n_tr, n_te, opts))


@lru_cache(maxsize=4)
def _fmnist_raw(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train [N,28,28], y_train, x_test, y_test) as uint8/int64 tensors; cached per process."""
    base = Path(root)
    xtr, ytr, xte, yte = (read_idx(f, 0x803 if "images" in f.name else 0x801) for f in _fmnist_files(root))
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataMissingError(f"Fashion-MNIST at {base}: image and label counts differ")
    return (torch.from_numpy(xtr.copy()), torch.from_numpy(ytr.astype(np.int64)),
            torch.from_numpy(xte.copy()), torch.from_numpy(yte.astype(np.int64)))


def _pixel_stats(x: torch.Tensor, pad_fraction: float) -> tuple[float, float]:
    """Mean/std of ``x/255`` after zero padding that makes ``pad_fraction`` of pixels zero."""
    hist = torch.bincount(x.reshape(-1), minlength=256).double()
    v = torch.arange(256, dtype=torch.float64) / 255.0
    keep = 1.0 - pad_fraction
    m1 = float((hist * v).sum() / hist.sum()) * keep
    m2 = float((hist * v * v).sum() / hist.sum()) * keep
    return m1, (m2 - m1 * m1) ** 0.5


def _fmnist_view(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    x = x.unsqueeze(1)
    if size > 28:
        lo = (size - 28) // 2
        x = torch.nn.functional.pad(x, (lo, size - 28 - lo, lo, size - 28 - lo))
    return x.repeat(1, channels, 1, 1) if channels > 1 else x.contiguous()


@TASKS.register("fashion_mnist", options=FashionMNISTOptions, modality="image", probe=probe_fashion_mnist,
                title="Fashion-MNIST")
def load_fashion_mnist(opts: FashionMNISTOptions, seed: int) -> TaskData:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (60k train, 10k test)."""
    xtr, ytr, xte, yte = _fmnist_raw(opts.root or FMNIST_ROOT)
    s, c = opts.image_size, opts.channels
    train, val, test = make_splits(Split(xtr, ytr), Split(xte, yte), opts, seed)
    train, val, test = (Split(_fmnist_view(p.x, s, c), p.y) for p in (train, val, test))
    mean, std = _pixel_stats(xtr, 1.0 - 28 * 28 / (s * s))
    detail = (f"{s}x{s} zero-padded" if s > 28 else "28x28") + (", grey x3" if c == 3 else ", grey")
    info = TaskInfo(name="fashion_mnist", modality="image", num_classes=10, in_channels=c,
                    image_size=s, mean=(mean,) * c, std=(std,) * c,
                    description=f"Fashion-MNIST (offline; {detail})")
    return TaskData(info, train, val, test, list(FMNIST_CLASSES))


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100

class CifarOptions(SplitOptions):
    """``root``: the ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent."""


def _unpickle(path: Path) -> dict:
    """The CIFAR archives are python pickles: read them with the restricted unpickler (plain
    containers and numpy arrays only; a file naming anything else is refused, never run)."""
    from ..io.safe_pickle import load_data_pickle

    d = load_data_pickle(path)
    if not isinstance(d, dict):
        raise DataMissingError(f"{path}: not a CIFAR batch (a {type(d).__name__}, expected a mapping)")
    return d


def _cifar_folder(root: str | None, folder: str, what: str) -> Path:
    if root:
        for cand in (Path(root).expanduser(), Path(root).expanduser() / folder):
            if (cand / ("batches.meta" if folder.startswith("cifar-10-") else "meta")).is_file():
                return cand
    where = root if root else "(task.options.root not set)"
    raise DataMissingError(f"{what} not found at {where}: download {folder} and set task.options.root")


def _rows_to_images(data) -> torch.Tensor:
    arr = np.asarray(data, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3072:
        raise DataMissingError(f"CIFAR batch has shape {arr.shape}, expected (N, 3072)")
    return torch.from_numpy(arr.reshape(-1, 3, 32, 32).copy())


def _cifar_layout(fine: bool):
    if fine:
        return ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"
    return [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", "batches.meta", b"label_names"


#: the official split sizes (fast validation does not count the examples)
CIFAR_SIZES = (50_000, 10_000)


def _probe_cifar(name: str, opts: CifarOptions, fine: bool) -> TaskShape:
    """Fast validation: the folder and every batch file are there, and no file references a
    global a data pickle may not hold (an opcode scan: nothing is unpickled). The split sizes
    are the official ones; ``mergenet validate --deep`` counts the real examples."""
    from ..io.safe_pickle import scan_data_pickle

    folder, what, k = (("cifar-100-python", "CIFAR-100", 100) if fine else ("cifar-10-batches-py", "CIFAR-10", 10))
    base = _cifar_folder(opts.root, folder, what)
    files_tr, files_te, _, meta, _ = _cifar_layout(fine)
    for files in (files_tr, files_te):
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise DataMissingError(f"CIFAR folder {base} lacks {', '.join(missing)}: re-download it")
        for f in files:
            scan_data_pickle(base / f)
    scan_data_pickle(base / meta)
    info = TaskInfo(name=name, modality="image", num_classes=k, in_channels=3, image_size=32)
    return TaskShape(info, *split_sizes(*CIFAR_SIZES, opts))


@lru_cache(maxsize=4)
def _cifar_raw(folder: str, fine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    base = Path(folder)
    files_tr, files_te, key, meta, names_key = _cifar_layout(fine)

    def load(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise DataMissingError(f"CIFAR folder {base} lacks {', '.join(missing)}: re-download it")
        parts = [_unpickle(base / f) for f in files]
        for f, p in zip(files, parts):
            if b"data" not in p or key not in p:
                raise DataMissingError(f"{base / f}: not a CIFAR batch (no {b'data'!r} / {key!r} entry)")
        x = torch.cat([_rows_to_images(p[b"data"]) for p in parts])
        y = torch.cat([torch.as_tensor(list(p[key]), dtype=torch.int64) for p in parts])
        return x, y

    xtr, ytr = load(files_tr)
    xte, yte = load(files_te)
    meta_d = _unpickle(base / meta)
    if names_key not in meta_d:
        raise DataMissingError(f"{base / meta}: no {names_key!r} entry")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta_d[names_key]]
    return xtr, ytr, xte, yte, names


def _load_cifar(name: str, opts: CifarOptions, seed: int, fine: bool) -> TaskData:
    folder, what, stats, k = (("cifar-100-python", "CIFAR-100", CIFAR100_STATS, 100) if fine
                              else ("cifar-10-batches-py", "CIFAR-10", CIFAR10_STATS, 10))
    xtr, ytr, xte, yte, names = _cifar_raw(str(_cifar_folder(opts.root, folder, what)), fine)
    train, val, test = make_splits(Split(xtr, ytr), Split(xte, yte), opts, seed)
    info = TaskInfo(name=name, modality="image", num_classes=k, in_channels=3, image_size=32,
                    mean=stats[0], std=stats[1], description=f"{what} (32x32 RGB)")
    return TaskData(info, train, val, test, names)


@TASKS.register("cifar10", options=CifarOptions, modality="image", title="CIFAR-10",
                probe=lambda opts: _probe_cifar("cifar10", opts, fine=False))
def load_cifar10(opts: CifarOptions, seed: int) -> TaskData:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (50k train, 10k test)."""
    return _load_cifar("cifar10", opts, seed, fine=False)


@TASKS.register("cifar100", options=CifarOptions, modality="image", title="CIFAR-100",
                probe=lambda opts: _probe_cifar("cifar100", opts, fine=True))
def load_cifar100(opts: CifarOptions, seed: int) -> TaskData:
    """CIFAR-100 (fine labels) from a local ``cifar-100-python`` folder (50k train, 10k test)."""
    return _load_cifar("cifar100", opts, seed, fine=True)
