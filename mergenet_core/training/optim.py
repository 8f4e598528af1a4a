"""Optimiser machinery shared by the roles and by methods' own modules (MergeNet's adapters):
parameter groups, step schedules, re-applying hyperparameters after a state load, and private
RNG streams. One copy, so a role's optimiser and an adapter's behave the same way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


def param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only; none on biases and normalisation weights
    (1-D tensors)."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def schedule_lambda(name: str, total: int, warmup: int = 0, milestones: Sequence[int] = (),
                    gamma: float = 0.1) -> Callable[[int], float]:
    """Per-step LR multiplier for ``LambdaLR``: linear warm-up over ``warmup`` steps, then
    ``constant``, ``multistep`` (x ``gamma`` at each milestone step) or ``cosine`` to 0 at
    step ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "multistep":
            return gamma ** sum(step >= m for m in milestones)
        if name == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return f


def reapply_hparams(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                    lr: float, weight_decay: float) -> None:
    """Make a loaded optimiser follow the configured ``lr`` and ``weight_decay`` again (a PBT
    exploit or an edited config may change them); the schedule position is kept."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = lr * lam(scheduler.last_epoch)
        if group["weight_decay"]:
            group["weight_decay"] = weight_decay


class RngStream:
    """A private global-RNG stream (CPU, and the CUDA device's when on CUDA): code run inside
    :meth:`scope` draws from it (dropout, init) and leaves the caller's stream untouched."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", seed_cuda: bool = False):
        """``seed_cuda``: the CUDA stream starts from ``seed`` too (else from the caller's CUDA
        stream at the first :meth:`scope`)."""
        self.device = torch.device(device)
        self.cpu = torch.Generator().manual_seed(seed).get_state()
        self.cuda: torch.Tensor | None = None
        self._cuda_seed = seed if seed_cuda else None

    @contextlib.contextmanager
    def scope(self):
        outer = torch.get_rng_state()
        cuda = self.device.type == "cuda"
        outer_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        torch.set_rng_state(self.cpu)
        if cuda and self.cuda is None and self._cuda_seed is not None:
            with torch.cuda.device(self.device):  # this stream's device, not the current one
                torch.cuda.manual_seed(self._cuda_seed)
        elif cuda and self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(outer)
            if cuda:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_dict(self) -> dict:
        return {"rng": self.cpu, "cuda_rng": self.cuda}

    def load_state_dict(self, state: dict) -> None:
        self.cpu, self.cuda = state["rng"], state.get("cuda_rng")
