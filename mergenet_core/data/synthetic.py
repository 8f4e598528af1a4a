"""A synthetic image task at CIFAR shape (``synthetic_images``): no files, so a benchmark or a
machine without data sets (the rare GPU machine, ``benchmarks/gpu_suite.py``) can train any
image pair.

Each class has a fixed smooth prototype image (a low-resolution random pattern, upsampled);
an example is its class's prototype plus per-pixel noise, quantised to uint8 like a real
data set, so a model learns it (accuracy above chance within an epoch) and the numbers are
finite and comparable run to run. Everything derives from ``data_seed`` on the CPU generator:
the same options give the same pixels on every machine. Generation is vectorised (50 000
CIFAR-size images take a fraction of a second).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from pydantic import Field

from .base import TASKS, Split, TaskData, TaskInfo, TaskShape
from .common import SplitOptions, generator, make_splits, split_sizes


class SyntheticImageOptions(SplitOptions):
    """Sizes of the official splits (before ``train_subset`` / ``val_fraction``), the shape, and
    how hard the task is (``noise``: the per-pixel noise's standard deviation, in pixel units)."""

    num_classes: int = Field(100, ge=2, le=1000)
    train_size: int = Field(10_000, ge=2, le=200_000)
    test_size: int = Field(2_000, ge=1, le=50_000)
    image_size: int = Field(32, ge=8, le=224)
    channels: int = Field(3, ge=1, le=4)
    noise: float = Field(48.0, ge=0.0, le=255.0)
    data_seed: int = Field(0, description="the pixels' seed (not the run seed: every run sees the same data)")


def _shape(opts: SyntheticImageOptions) -> TaskInfo:
    c, s = opts.channels, opts.image_size
    return TaskInfo(name="synthetic_images", modality="image", num_classes=opts.num_classes, in_channels=c,
                    image_size=s, mean=(0.5,) * c, std=(0.25,) * c,
                    description=f"synthetic images ({s}x{s}, {c}ch, {opts.num_classes} classes; no data set)")


def probe_synthetic(opts: SyntheticImageOptions) -> TaskShape:
    info = _shape(opts)
    info.mean, info.std = (), ()
    return TaskShape(info, *split_sizes(opts.train_size, opts.test_size, opts))


@lru_cache(maxsize=4)
def _pixels(k: int, n_train: int, n_test: int, size: int, channels: int, noise: float,
            seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = generator(seed, 0x5A17)
    low = max(2, size // 8)
    protos = torch.rand(k, channels, low, low, generator=g) * 255.0
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n, dtype=torch.int64) % k  # balanced classes
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] + noise * torch.randn(n, channels, size, size, generator=g)
        return x.round_().clamp_(0, 255).to(torch.uint8), y

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return xtr, ytr, xte, yte


@TASKS.register("synthetic_images", options=SyntheticImageOptions, modality="image", probe=probe_synthetic,
                title="synthetic images")
def load_synthetic_images(opts: SyntheticImageOptions, seed: int) -> TaskData:
    """Generated in memory (default: CIFAR-100 shape, 10 000 train / 2 000 test examples)."""
    xtr, ytr, xte, yte = _pixels(opts.num_classes, opts.train_size, opts.test_size, opts.image_size,
                                 opts.channels, float(opts.noise), int(opts.data_seed))
    train, val, test = make_splits(Split(xtr, ytr), Split(xte, yte), opts, seed)
    return TaskData(_shape(opts), train, val, test, [f"class {i}" for i in range(opts.num_classes)])
