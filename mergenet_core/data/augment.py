"""Batched, generator-driven image preparation (no torchvision): crop + flip + normalise."""
from __future__ import annotations

import torch

from .base import TaskInfo


def _rand(gen: torch.Generator | None, n: int, high: int | None = None) -> torch.Tensor:
    dev = gen.device if gen is not None else torch.device("cpu")
    if high is None:
        return torch.rand(n, generator=gen, device=dev)
    return torch.randint(0, high, (n,), generator=gen, device=dev)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None) -> torch.Tensor:
    """Zero-pad by ``pad`` then crop back to the input size at a random offset per sample."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = _rand(gen, n, 2 * pad + 1).to(x.device)
    ox = _rand(gen, n, 2 * pad + 1).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    b = torch.arange(n, device=x.device)[:, None, None, None]
    ch = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[b, ch, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample horizontally with probability ``p``."""
    mask = (_rand(gen, x.shape[0]) < p).to(x.device)[:, None, None, None]
    return torch.where(mask, x.flip(-1), x)


def prepare_images(
    x_uint8: torch.Tensor,
    info: TaskInfo,
    train: bool,
    generator: torch.Generator | None = None,
    crop_pad: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """uint8 ``[N,C,H,W]`` -> normalised float32 on ``x``'s device.

    ``train=True`` applies a random zero-padded crop (``crop_pad`` > 0) and a random
    horizontal flip, drawn from ``generator`` (same generator state -> same batch).
    ``train=False`` only scales to [0, 1] and normalises with ``info.mean`` / ``info.std``.
    """
    x = x_uint8
    if train and crop_pad > 0:
        x = random_crop(x, crop_pad, generator)
    if train and flip:
        x = random_flip(x, generator)
    x = x.float().div_(255.0)
    if info.mean:
        mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.tensor(info.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        x = (x - mean).div_(std)
    return x
