"""Deterministic, resumable batch iteration over a :class:`Split`."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..errors import ConfigError
from .base import Split
from .common import mix_seed

Batch = tuple["torch.Tensor | dict[str, torch.Tensor]", torch.Tensor]


class BatchStream:
    """Endless batches; epoch ``e`` is ``randperm(n)`` seeded by ``mix_seed(seed, e)``.

    The position is ``(epoch, index)``; :meth:`state_dict` / :meth:`load_state_dict` save and
    restore it, so a resumed stream yields exactly the batches the original would have.
    """

    def __init__(self, split: Split, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        n = len(split)
        if batch_size < 1 or n == 0 or (drop_last and batch_size > n):
            raise ConfigError("batch_size", f"{batch_size} does not fit a split of {n} examples")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        self.epoch, self.index = 0, 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            n = len(self.split)
            self._perm = (torch.randperm(n, generator=torch.Generator().manual_seed(
                mix_seed(self.seed, self.epoch))) if self.shuffle else torch.arange(n))
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next(self) -> Batch:
        """The next batch ``(x, y)``; rolls over into the next epoch when one is exhausted."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        idx = self._order()[start:start + self.batch_size]
        self.index += 1
        return self.split.take(idx)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def iter_eval(split: Split, batch_size: int) -> Iterator[Batch]:
    """Sequential batches in order, last partial batch kept (for evaluation)."""
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        x = {k: v[sl] for k, v in split.x.items()} if isinstance(split.x, dict) else split.x[sl]
        yield x, split.y[sl]
