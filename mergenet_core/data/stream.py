"""Deterministic, resumable batch iteration over a :class:`Split`.

A split whose ``x`` is *lazy* (``x.lazy`` is true: images held as file paths or dataset rows,
e.g. :class:`mergenet_core.data.folder.ImageFiles`) is read ahead through a torch
``DataLoader``: item ``k`` of its dataset is batch ``k`` of the stream, decoded in ``x.workers``
worker processes (pinned when CUDA is available). The batches, their order and the resume
semantics are those of the same split held in memory. A lazy ``x`` indexes into another lazy
view (``Split.take`` and the split helpers index the path list) and ``x.load()`` decodes it.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from .base import Split
from .common import mix_seed

Batch = tuple["torch.Tensor | dict[str, torch.Tensor]", torch.Tensor]


def is_lazy(x) -> bool:
    """Whether a split's ``x`` is read from disk batch by batch (see the module docstring)."""
    return bool(getattr(x, "lazy", False))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The example order of one epoch: ``randperm(n)`` seeded by ``mix_seed(seed, epoch)``."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


class _StreamBatches(Dataset):
    """Item ``k``: batch ``k`` of an endless stream (epoch ``k // steps``, batch ``k % steps`` of
    that epoch's order), decoded. Each worker process keeps its own copy of the last epoch's order."""

    def __init__(self, split: Split, batch_size: int, seed: int, shuffle: bool, steps: int):
        self.split, self.batch_size, self.seed, self.shuffle, self.steps = split, batch_size, seed, shuffle, steps
        self._perm, self._perm_epoch = None, -1

    def __getitem__(self, k: int) -> Batch:
        epoch, index = divmod(int(k), self.steps)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = epoch_order(len(self.split), self.seed, epoch, self.shuffle), epoch
        xs, ys = self.split.take(self._perm[index * self.batch_size:(index + 1) * self.batch_size])
        return xs.load(), ys


class _EvalBatches(Dataset):
    """Item ``i``: the ``i``-th sequential batch of a split (last one partial), decoded."""

    def __init__(self, split: Split, batch_size: int):
        self.split, self.batch_size = split, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        xs, ys = self.split.take(torch.arange(i * self.batch_size, min(len(self.split), (i + 1) * self.batch_size)))
        return xs.load(), ys


class _CountFrom(Sampler):
    """``start, start + 1, ...`` without end (an endless stream's batch numbers)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _loader(dataset: Dataset, workers: int, sampler: Sampler | None = None) -> DataLoader:
    """Batches decoded by ``workers`` processes (none in a daemonic process: it may not have
    children), pinned when CUDA is available."""
    import multiprocessing

    workers = 0 if multiprocessing.current_process().daemon else max(0, int(workers))
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


class BatchStream:
    """Endless batches; epoch ``e`` is ``randperm(n)`` seeded by ``mix_seed(seed, e)``.

    The position is ``(epoch, index)``; :meth:`state_dict` / :meth:`load_state_dict` save and
    restore it, so a resumed stream yields exactly the batches the original would have. A lazy
    split's batches are read ahead by a ``DataLoader`` (started at the first :meth:`next`,
    restarted by :meth:`load_state_dict`, stopped by :meth:`close`).
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
        self._ahead: Iterator[Batch] | None = None  # a lazy split's read-ahead

    def _order(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            self._perm = epoch_order(len(self.split), self.seed, self.epoch, self.shuffle)
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next(self) -> Batch:
        """The next batch ``(x, y)``; rolls over into the next epoch when one is exhausted."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if is_lazy(self.split.x):
            if self._ahead is None:
                data = _StreamBatches(self.split, self.batch_size, self.seed, self.shuffle, self.steps_per_epoch)
                start = self.epoch * self.steps_per_epoch + self.index
                self._ahead = iter(_loader(data, self.split.x.workers, _CountFrom(start)))
            self.index += 1
            return next(self._ahead)
        start = self.index * self.batch_size
        idx = self._order()[start:start + self.batch_size]
        self.index += 1
        return self.split.take(idx)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def close(self) -> None:
        """Stop a lazy split's read-ahead workers (the next :meth:`next` starts them again)."""
        self._ahead = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ahead": None}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.close()


def iter_eval(split: Split, batch_size: int) -> Iterator[Batch]:
    """Sequential batches in order, last partial batch kept (for evaluation); a lazy split's
    batches are decoded ahead by a ``DataLoader`` with its ``x.workers`` workers."""
    if is_lazy(split.x):
        data = _EvalBatches(split, batch_size)
        yield from _loader(data, min(split.x.workers, len(data)))
        return
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        x = {k: v[sl] for k, v in split.x.items()} if isinstance(split.x, dict) else split.x[sl]
        yield x, split.y[sl]
