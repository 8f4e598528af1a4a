"""Shared helpers for task loaders: option models, seeded splitting, locating package data."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import DataMissingError
from .base import Split

# Fixed seed for carving a test set out of corpora without an official one: the test set
# must never depend on the run seed.
TEST_SEED = 0
TEST_FRACTION = 0.2

# Salts so that the subset, validation and epoch streams of one run seed are independent.
SALT_TRAIN_SUBSET, SALT_VAL, SALT_TEST_SUBSET, SALT_TEST_CARVE, SALT_VAL_POOL = 1, 2, 3, 4, 5


class SplitOptions(BaseModel):
    """Options every task accepts.

    ``train_subset`` keeps that many examples of the official training set (drawn by seed,
    class-stratified) *before* ``val_fraction`` of them are carved off as validation; with
    ``val_size`` the whole subset trains and validation is drawn from the rest of the training set.
    ``val_size`` without ``train_subset``: validation is that many examples drawn (by seed,
    stratified) from the whole training set, as ``val_fraction`` would carve them, and the rest trains.
    ``test_subset`` keeps that many test examples, drawn with a fixed seed so that every
    run of an experiment is scored on the same items.
    ``val_pool`` reserves that many training examples, drawn with a fixed seed (the same for every
    run seed, model and role): validation is drawn (by seed, ``val_size`` of them, or all) from
    the pool only, and training examples never come from it. A donor and its targets that give
    the same ``val_pool`` are disjoint by construction: no donor trains on any target's
    validation (or test) examples.
    """

    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(0.1, gt=0.0, lt=1.0,
                                description="> 0: the best-validation epoch and schedulers need a validation split")
    val_size: int | None = Field(None, gt=0, description="validation = this many examples drawn (by seed, "
                                                        "stratified) from the training examples outside "
                                                        "train_subset (without train_subset: from the whole "
                                                        "training set, the rest trains); overrides val_fraction")
    val_pool: int | None = Field(None, gt=0, description="a fixed, seed-independent pool of this many training "
                                                          "examples reserved for validation: training never draws "
                                                          "from it, validation (val_size of them, or all) only from "
                                                          "it; give donors and targets the same val_pool")
    train_subset: int | None = Field(None, gt=0)
    test_subset: int | None = Field(None, gt=0)
    root: str | None = None


def mix_seed(*parts: int) -> int:
    """Deterministic (hash-free) combination of integers into a 63-bit generator seed."""
    h = 0x5EED
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B9) % (1 << 63)
    return h


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def stratified_order(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of ``range(len(y))`` whose every prefix is class-stratified.

    Shuffle, rank each item within its class, then order by ``(rank + 0.5) / class_size``
    so the classes are interleaved in proportion to their sizes.
    """
    n = int(y.shape[0])
    perm = torch.randperm(n, generator=gen)
    yp = y[perm].long()
    order = torch.sort(yp, stable=True).indices
    counts = torch.bincount(yp)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[yp[order]]
    key = (rank.double() + 0.5) / counts[yp].double()
    return perm[torch.sort(key, stable=True).indices]


def take_subset(y: torch.Tensor, k: int | None, gen: torch.Generator) -> torch.Tensor:
    """Indices of a stratified subset of size ``k`` (all indices, in order, if ``k`` is None)."""
    n = int(y.shape[0])
    if k is None or k >= n:
        return torch.arange(n)
    return torch.sort(stratified_order(y, gen)[:k]).values


def split_of(x: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor, idx: torch.Tensor) -> Split:
    xs, ys = Split(x, y).take(idx)
    return Split(xs, ys)


def make_splits(
    train: Split, test: Split, opts: SplitOptions, seed: int
) -> tuple[Split, Split, Split]:
    """Apply ``train_subset``, carve validation from train by seed, apply ``test_subset``."""
    if opts.val_pool is not None:
        return _pooled_splits(train, test, opts, seed)
    pool = take_subset(train.y, opts.train_subset, generator(seed, SALT_TRAIN_SUBSET))
    # low-data target: validation from the examples it never trains on
    if opts.val_size is not None and opts.train_subset is not None:
        rest = torch.ones(len(train.y), dtype=torch.bool)
        rest[pool] = False
        rest_idx = torch.nonzero(rest).squeeze(1)
        if opts.val_size > len(rest_idx):
            from ..errors import ConfigError

            raise ConfigError("val_size", f"{opts.val_size} validation examples requested but only "
                                          f"{len(rest_idx)} training examples lie outside train_subset")
        val_idx = rest_idx[take_subset(train.y[rest_idx], opts.val_size, generator(seed, SALT_VAL))]
        te_idx = take_subset(test.y, opts.test_subset, generator(TEST_SEED, SALT_TEST_SUBSET))
        return (split_of(train.x, train.y, pool), split_of(train.x, train.y, val_idx),
                split_of(test.x, test.y, te_idx))
    n_val = _carved_val(len(pool), opts)
    order = stratified_order(train.y[pool], generator(seed, SALT_VAL))
    val_idx = pool[torch.sort(order[:n_val]).values]
    tr_idx = pool[torch.sort(order[n_val:]).values]
    te_idx = take_subset(test.y, opts.test_subset, generator(TEST_SEED, SALT_TEST_SUBSET))
    return (split_of(train.x, train.y, tr_idx), split_of(train.x, train.y, val_idx),
            split_of(test.x, test.y, te_idx))


def _carved_val(n_pool: int, opts: SplitOptions) -> int:
    """How many of the ``n_pool`` training examples validation carves: ``val_size`` (without
    ``train_subset``) or ``val_fraction`` of them; a ``val_size`` that leaves none to train on is refused."""
    if opts.val_size is None:
        return int(round(opts.val_fraction * n_pool))
    if opts.val_size >= n_pool:
        from ..errors import ConfigError

        raise ConfigError("val_size", f"{opts.val_size} validation examples requested leave none of the "
                                      f"{n_pool} training examples to train on")
    return opts.val_size


def val_pool_indices(y: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reserved pool, the rest) of an official training set: a fixed, stratified draw that
    depends on nothing but ``size`` and the labels."""
    _check_pool(len(y), size)
    order = stratified_order(y, generator(TEST_SEED, SALT_VAL_POOL))
    return torch.sort(order[:size]).values, torch.sort(order[size:]).values


def _check_pool(n_train: int, size: int, val_size: int | None = None) -> None:
    from ..errors import ConfigError

    if size >= n_train:
        raise ConfigError("val_pool", f"{size} reserved validation examples leave none of the "
                                      f"{n_train} training examples to train on")
    if val_size is not None and val_size > size:
        raise ConfigError("val_size", f"{val_size} validation examples requested from a val_pool of {size}")


def _pooled_splits(train: Split, test: Split, opts: SplitOptions, seed: int) -> tuple[Split, Split, Split]:
    """``val_pool``: validation by seed from the fixed pool, the training subset by seed from the rest."""
    _check_pool(len(train.y), opts.val_pool, opts.val_size)
    reserved, rest = val_pool_indices(train.y, opts.val_pool)
    tr_idx = rest[take_subset(train.y[rest], opts.train_subset, generator(seed, SALT_TRAIN_SUBSET))]
    val_idx = reserved[take_subset(train.y[reserved], opts.val_size, generator(seed, SALT_VAL))]
    te_idx = take_subset(test.y, opts.test_subset, generator(TEST_SEED, SALT_TEST_SUBSET))
    return (split_of(train.x, train.y, tr_idx), split_of(train.x, train.y, val_idx),
            split_of(test.x, test.y, te_idx))


def split_sizes(n_train: int, n_test: int, opts: SplitOptions) -> tuple[int, int, int]:
    """(train, val, test) sizes that :func:`make_splits` gives for an official train set of
    ``n_train`` and a test set of ``n_test`` examples, computed without the data (fast
    validation); raises the same :class:`ConfigError` for an impossible ``val_size``."""
    test = n_test if opts.test_subset is None else min(opts.test_subset, n_test)
    if opts.val_pool is not None:
        _check_pool(n_train, opts.val_pool, opts.val_size)
        rest = n_train - opts.val_pool
        train = rest if opts.train_subset is None else min(opts.train_subset, rest)
        return train, opts.val_size or opts.val_pool, test
    pool = n_train if opts.train_subset is None else min(opts.train_subset, n_train)
    if opts.val_size is not None and opts.train_subset is not None:
        if opts.val_size > n_train - pool:
            from ..errors import ConfigError

            raise ConfigError("val_size", f"{opts.val_size} validation examples requested but only "
                                          f"{n_train - pool} training examples lie outside train_subset")
        return pool, opts.val_size, test
    n_val = _carved_val(pool, opts)
    return pool - n_val, n_val, test


def carve_sizes(n: int, fraction: float = TEST_FRACTION) -> tuple[int, int]:
    """(train, test) sizes of :func:`carve_test` on ``n`` examples."""
    n_test = int(round(fraction * n))
    return n - n_test, n_test


def carve_test(y: torch.Tensor, fraction: float = TEST_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, test_idx) for corpora without an official test set; fixed seed, stratified."""
    order = stratified_order(y, generator(TEST_SEED, SALT_TEST_CARVE))
    n_test = int(round(fraction * int(y.shape[0])))
    return torch.sort(order[n_test:]).values, torch.sort(order[:n_test]).values


def package_dir(package: str, what: str, install: str) -> Path:
    """Folder of an installed top-level package, found without importing (executing) it."""
    spec = importlib.util.find_spec(package)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locs:
        raise DataMissingError(f"{what} not found: {install}")
    return Path(locs[0])
