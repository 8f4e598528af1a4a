"""The single-process host: one pair trained in this process by :class:`~.loop.PairLoop`.

Per epoch the loop evaluates every trained role on val and test, appends one JSON line to
``metrics.jsonl``, and writes a checkpoint bundle (models, optimisers, schedulers, data
positions, RNG streams, method state) by the loop's policy. ``resume=True`` continues from the
last bundle exactly: 2 epochs straight equal 1 + resume + 1. ``mergenet train`` and the Tune
trials of inline pairs (``orchestrator/topology/inline.py``) run this host; the Ray pair's role workers
(``orchestrator/topology/split/worker.py``) run the same loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import ExperimentConfig
from ..io.outputs import RunOutputs
from .loop import BEST, CHECKPOINT, FINAL, METRICS, PairLoop, PairState, load_bundle, save_bundle  # noqa: F401
from .roles import resolve_device
from ..io.safe_io import restore_into
from .step import take_step


class Engine:
    """Train one pair in this process. ``on_epoch(record)`` lets callers log each epoch;
    ``on_checkpoint(path, record)`` runs after each bundle write (``checkpoint.pt``, and
    ``best.pt`` unless ``keep_bundles`` is ``last``: the bundle of the best-validation epoch)."""

    lead = role_leader = True

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                 on_epoch: Callable[[dict], None] | None = None,
                 on_checkpoint: Callable[[Path, dict], None] | None = None, keep_bundles: str = "last",
                 role_streams: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self.on_epoch = on_epoch
        self.on_checkpoint = on_checkpoint
        self.keep_bundles = keep_bundles
        self.device = resolve_device(cfg.device)
        self.pair = PairState.build(cfg, devices={n: self.device for n in ("source", "target")})
        #: ``role_streams`` (CUDA only; ``benchmarks/gpu_suite.py`` measures it): each role's part
        #: of a step on its own CUDA stream (``take_step(streams=)``); ignored on a CPU
        self.streams = ({n: torch.cuda.Stream(self.device) for n in self.pair.roles}
                        if role_streams and self.device.type == "cuda" else None)

    # ---------------------------------------------------------------- Host
    def step(self, step: int) -> None:
        take_step(self.pair, step, streams=self.streams)

    def gather(self, local: dict) -> dict:
        return local

    def role_states(self) -> dict:
        return {n: self.pair.role_state(n) for n in self.pair.roles}

    def save(self, bundle: dict, record: dict, best: bool) -> None:
        if best and self.keep_bundles != "last":  # first: a crash in between never leaves a
            save_bundle(self.out / BEST, bundle)  # history whose best bundle is older
        save_bundle(self.out / CHECKPOINT, bundle)
        if self.on_checkpoint:
            self.on_checkpoint(self.out / CHECKPOINT, record)

    def on_record(self, record: dict) -> None:
        if self.on_epoch:
            self.on_epoch(record)

    def end_epoch(self, record: dict | None, saved: bool, best: bool) -> None:
        pass

    # ---------------------------------------------------------------- run
    def run(self, resume: bool = False, stop_after_epochs: int | None = None,
            until_epoch: int | None = None) -> dict[str, float]:
        """Train to the configured number of epochs (or ``stop_after_epochs`` more, or up to
        epoch ``until_epoch``)."""
        pair = self.pair
        outputs = RunOutputs(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.out / CHECKPOINT
        if resume and ckpt.exists():
            restore_into(ckpt, pair.load_state_dict, load_bundle(ckpt))
        # a fresh run never leaves a previous run's summary; the history is the bundle's
        outputs.begin(self.cfg, fresh=not resume, history=pair.history)
        end = self.cfg.target.recipe.epochs
        if stop_after_epochs is not None:
            end = min(end, pair.epoch + stop_after_epochs)
        if until_epoch is not None:
            end = min(end, until_epoch)
        bar = _progress(total=max(0, end - pair.epoch) * pair.steps_per_epoch, enabled=self.progress,
                        desc=self.cfg.name)
        loop = PairLoop(self, keep_bundles=self.keep_bundles, until_epoch=end, outputs=outputs,
                        on_step=lambda: bar.update(1))
        final = loop.run()
        bar.close()
        return outputs.finish(final)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, leave=False)
