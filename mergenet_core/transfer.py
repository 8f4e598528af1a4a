"""The MergeNet transfer cycle: links, the adapter hub and the exchange protocol.

A *link* carries knowledge from one role's weight (provider, keys/values ``Y``) into
another role's weight (receiver, queries ``X``); one adapter per link. ``direction: both``
adds the reverse link of every layer pair; ``self_transfer`` makes both ends the target.

Per transfer step ``k`` every role runs three phases (see ``methods/mergenet.py``):

1. ``put``: send the matrices it contributes (providers: ``A_s``; receivers: ``A_t``);
2. ``get``: receive the generated ``A'_t`` for each link it receives, write it in place;
3. after its own optimiser step, ``feedback``: the tensor the update rule needs
   (``delta``: ``A'_t - A_t^after``; ``exact``: ``dL_t/dA'_t``), and the hub updates the adapter.

:class:`Exchange` implements the protocol in-process around an :class:`AdapterHub`; the Ray
adapter actor wraps the very same class, so the single-process engine and the Ray topology
run identical code. ``get`` blocks until every ``put`` of that step has arrived, which is
what lets two Ray workers call it concurrently.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from .adapter import ParameterAdapter, adapter_param_count
from .errors import TransferError


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerPair(_Opts):
    source: str = Field(description="source parameter name (dense weight name, e.g. layer4.1.conv2.weight)")
    target: str = Field(description="target parameter name")
    mode: Literal["learned", "svd", "full"] = "learned"
    rank: PositiveInt = 4
    alpha: float | None = Field(None, gt=0, description="learned mode scaling alpha/r (default: rank)")
    output_scale: Literal["none", "rms", "learned"] = Field(
        "rms", description="rms: rescale the adapter output to the RMS of the matrix it replaces")
    align: bool = Field(True, description="svd: canonical signs + Procrustes alignment of each "
                                          "read's factors to the previous read's (stable tokens)")


#: the authors' adapter (``adapter.preset: authors``); explicitly set fields still win
AUTHORS_ADAPTER: dict = {
    "layers": 2, "heads": 8, "combine": "mean", "gelu": "tanh", "ln_eps": 1e-12,
    "attn_dropout": 0.1, "ffn_dropout": 0.2, "generate_dropout": True,
    "weight_decay": 5e-4, "grad_clip": 50.0, "schedule": "cosine", "hold_epochs": 4,
}


class AdapterOptions(_Opts):
    preset: Literal["default", "authors"] = Field(
        "default", description="authors: the authors' adapter (mean combination, tanh-GELU, LayerNorm "
                               "eps 1e-12, cosine held for 4 epochs); fields set explicitly override it")
    layers: PositiveInt = 2
    heads: PositiveInt = 8
    combine: Literal["learned", "mean"] = Field(
        "learned", description="O_rr/O_rc/O_cr/O_cc combination: softmax of a learnable 4-vector "
                               "(initialised equal) or the fixed mean (no mixing weights)")
    gelu: Literal["erf", "tanh"] = Field("erf", description="GELU of the KTL feed-forward: exact (erf) or tanh approximation")
    ln_eps: float = Field(1e-5, gt=0, lt=1, description="LayerNorm epsilon inside the adapter")
    gate: bool = Field(False, description="zero-initialised residual gate: write X + g (X' - X), g learned "
                                          "from 0, so an untrained adapter changes nothing")
    width: PositiveInt | None = Field(None, description="fixed model width: every attention block projects its "
                                                        "tokens to this width (width/heads per head) and the FFN's "
                                                        "hidden layer has this width; default: the authors' "
                                                        "widths (max((d_q+d_kv)//2, 128) and 2q)")
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    ffn_dropout: float = Field(0.2, ge=0, lt=1)
    generate_dropout: bool = Field(True, description="dropout active when generating the written weights "
                                                     "(false: attention and FFN dropout off)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float = Field(50.0, gt=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    hold_epochs: int = Field(0, ge=0, validation_alias=AliasChoices("hold_epochs", "start_epoch"),
                             description="keep the adapter LR constant for the first N epochs, then the "
                                         "schedule, stepped only on transfer steps (alias: start_epoch)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") == "authors":
            base = dict(AUTHORS_ADAPTER)
            if "start_epoch" in data:
                base.pop("hold_epochs")
            return {**base, **data}
        return data

    @model_validator(mode="after")
    def _width(self) -> "AdapterOptions":
        if self.width is not None and self.width < self.heads:
            raise ValueError(f"width: {self.width} leaves less than one unit per head ({self.heads} heads)")
        return self

    @property
    def start_epoch(self) -> int:  # the former name
        return self.hold_epochs

    @property
    def dropouts(self) -> tuple[float, float]:
        """(attention, FFN) dropout used when generating."""
        return (self.attn_dropout, self.ffn_dropout) if self.generate_dropout else (0.0, 0.0)


class MergeNetOptions(_Opts):
    layer_pairs: list[LayerPair] = Field(min_length=1)
    t_cycle: PositiveInt = 1
    update_rule: Literal["delta", "exact"] = "delta"
    adapter: AdapterOptions = Field(default_factory=AdapterOptions)
    direction: Literal["forward", "both"] = "forward"
    freeze_source: bool = False
    self_transfer: bool = Field(False, description="both parameters live in the target model")
    control: Literal["none", "untrained_source", "shuffled_source", "noise_source"] = Field(
        "none", description="negative controls: untrained_source (the source at its seed's init, frozen), "
                            "shuffled_source (source factor rows and columns permuted at every transfer), "
                            "noise_source (source factor replaced by Gaussian noise of the same RMS)")
    max_bad_transfers: PositiveInt = Field(3, description="consecutive non-finite outputs before the run fails")

    @model_validator(mode="after")
    def _combos(self) -> "MergeNetOptions":
        if self.freeze_source and self.direction == "both":
            raise ValueError("freeze_source: a frozen source cannot receive transfers (direction: both)")
        if self.self_transfer and self.freeze_source:
            raise ValueError("freeze_source: self_transfer has no separate source")
        if self.control != "none" and self.self_transfer:
            raise ValueError(f"control: '{self.control}' needs a separate source (self_transfer is on)")
        if self.control == "untrained_source" and self.direction == "both":
            raise ValueError("control: the untrained source is frozen and cannot receive transfers (direction: both)")
        return self

    @property
    def source_frozen(self) -> bool:
        return self.freeze_source or self.control == "untrained_source"


@dataclass(frozen=True)
class Link:
    id: str
    index: int          # layer pair index
    provider: str       # role whose weight is the source Y
    provider_param: str
    receiver: str       # role whose weight is rewritten (X)
    receiver_param: str
    pair: LayerPair
    reverse: bool = False  # direction both: target -> source

    def ends(self) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        """((role, param, config side) of the provider, same of the receiver)."""
        a, b = ("target", "source") if self.reverse else ("source", "target")
        return (self.provider, self.provider_param, a), (self.receiver, self.receiver_param, b)


def make_links(opts: MergeNetOptions) -> list[Link]:
    src_role = "target" if opts.self_transfer else "source"
    links = []
    for i, lp in enumerate(opts.layer_pairs):
        links.append(Link(str(i), i, src_role, lp.source, "target", lp.target, lp))
        if opts.direction == "both":
            links.append(Link(f"{i}r", i, "target", lp.target, src_role, lp.source, lp, reverse=True))
    return links


def exact_grad(enc, weight_grad: Tensor | None = None) -> Tensor:
    """``dL/dA'`` for the ``exact`` rule from the gradient already on the written parameter.

    After ``write(A')`` the receiver's parameter equals ``A'`` (learned, full) or
    ``W + B(A' - A)`` (svd), so the chain rule gives ``dL/dA'`` from ``param.grad`` —
    the same number ``functional_call`` through the generated weight gives (tested).
    """
    from .lowrank import conv_to_matrix

    param = enc.parameters_touched()[0]
    g = param.grad if weight_grad is None else weight_grad
    if g is None:
        return torch.zeros(tuple(enc.shape), device=param.device)
    if enc.mode == "learned":
        return g.detach().clone()
    gm = conv_to_matrix(g.detach())
    if enc.mode == "full":
        return gm.clone()
    b, _ = enc.factors
    return b.t() @ gm


def _lambda(schedule: str, total: int):
    if schedule == "cosine":
        return lambda k: 0.5 * (1 + math.cos(math.pi * min(1.0, k / max(1, total))))
    return lambda k: 1.0


class AdapterHub:
    """Every link's adapter with its own AdamW optimiser and schedule, plus transfer stats."""

    def __init__(self, opts: MergeNetOptions, shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]],
                 links: list[Link], seed: int, transfers_after_start: int,
                 device: torch.device | str = "cpu"):
        self.opts = opts
        self.links = {l.id: l for l in links}
        self.device = torch.device(device)
        a = opts.adapter
        # the adapter's own RNG streams (init + dropout), leaving every caller's stream untouched
        cuda_devices = list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(seed)
            self.adapters = nn.ModuleDict({
                lid: ParameterAdapter(shapes[lid][0], shapes[lid][1], a.layers, a.heads, *a.dropouts,
                                      self.links[lid].pair.output_scale, combine=a.combine, gelu=a.gelu,
                                      ln_eps=a.ln_eps, width=a.width, gate=a.gate)
                for lid in self.links}).to(self.device)
            self.rng = torch.get_rng_state()
            self.cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self.optimizers, self.schedulers = {}, {}
        for lid, ad in self.adapters.items():
            decay = [p for p in ad.parameters() if p.ndim > 1]
            rest = [p for p in ad.parameters() if p.ndim <= 1]
            groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}]
            try:  # the fused kernel (CPU since torch 2.4, and CUDA): fewer, larger kernels per step
                opt = torch.optim.AdamW(groups, lr=a.lr, fused=True)
            except (RuntimeError, TypeError):
                opt = torch.optim.AdamW(groups, lr=a.lr)
            self.optimizers[lid] = opt
            self.schedulers[lid] = torch.optim.lr_scheduler.LambdaLR(opt, _lambda(a.schedule, transfers_after_start))
        self.pending: dict[tuple[int, str], tuple[Tensor, dict | None]] = {}
        self.bad_streak = {lid: 0 for lid in self.links}
        self.totals = {"transfers": 0, "skipped": 0}
        self._epoch = self._fresh_epoch()

    @staticmethod
    def _fresh_epoch() -> dict:
        return {"transfers": 0, "skipped": 0, "grad_norm": 0.0, "updates": 0, "generate_s": 0.0, "update_s": 0.0}

    def param_counts(self) -> dict[str, int]:
        return {lid: adapter_param_count(ad) for lid, ad in self.adapters.items()}

    def generate(self, step: int, inputs: dict[str, tuple[Tensor, Tensor]],
                 snapshot: bool = False) -> dict[str, Tensor | None]:
        """Adapter outputs for every link (``None`` where the output was not finite).

        ``snapshot``: run each adapter on a detached copy of its parameters, so that its
        update may come after other updates (async exchange): the gradient is then taken at
        the parameters that generated the output (a delayed gradient, as in asynchronous
        SGD), and an optimiser step in between cannot invalidate the saved graph.
        """
        t0 = time.perf_counter()
        out: dict[str, Tensor | None] = {}
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        cuda = self.device.type == "cuda"
        if cuda:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            for lid, (x, y) in inputs.items():
                ad = self.adapters[lid]
                ad.train()
                x, y = x.to(self.device, torch.float32), y.to(self.device, torch.float32)
                if snapshot:
                    snap = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in ad.named_parameters()}
                    fresh_scale = hasattr(ad, "scale_initialised") and not bool(ad.scale_initialised)
                    new = torch.func.functional_call(ad, snap, (x, y), {"reference": x})
                    if fresh_scale and bool(ad.scale_initialised):  # the first call set the learned scale
                        with torch.no_grad():
                            ad.scale.copy_(snap["scale"])
                else:
                    snap = None
                    new = ad(x, y, reference=x)
                if not torch.isfinite(new).all():
                    self.bad_streak[lid] += 1
                    self._epoch["skipped"] += 1
                    self.totals["skipped"] += 1
                    import warnings

                    warnings.warn(f"mergenet: non-finite adapter output for link {lid} at step {step}; "
                                  "transfer skipped", RuntimeWarning, stacklevel=2)
                    if self.bad_streak[lid] >= self.opts.max_bad_transfers:
                        raise TransferError(
                            f"adapter for layer pair {self.links[lid].index} produced non-finite weights "
                            f"{self.bad_streak[lid]} transfers in a row (step {step}); lower method.options."
                            "adapter.lr or check the paired layers")
                    out[lid] = None
                    continue
                self.bad_streak[lid] = 0
                self.pending[(step, lid)] = (new, snap)
                out[lid] = new.detach().clone()
                self._epoch["transfers"] += 1
                self.totals["transfers"] += 1
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(outer)
            if cuda:
                self.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)
        self._epoch["generate_s"] += time.perf_counter() - t0
        return out

    def update(self, step: int, grads: dict[str, Tensor], epoch: int) -> None:
        """Back-propagate each link's output gradient into its adapter and step it."""
        t0 = time.perf_counter()
        for lid, g in grads.items():
            entry = self.pending.pop((step, lid), None)
            if entry is None:
                continue
            new, snap = entry
            opt = self.optimizers[lid]
            opt.zero_grad(set_to_none=True)
            new.backward(g.to(new.device, new.dtype))
            if snap is not None:  # gradient of the generating copy -> the live parameters
                for n, p in self.adapters[lid].named_parameters():
                    p.grad = snap[n].grad
            norm = nn.utils.clip_grad_norm_(self.adapters[lid].parameters(), self.opts.adapter.grad_clip)
            opt.step()
            if epoch >= self.opts.adapter.hold_epochs:
                self.schedulers[lid].step()
            self._epoch["grad_norm"] += float(norm)
            self._epoch["updates"] += 1
        self._epoch["update_s"] += time.perf_counter() - t0

    def take_epoch_metrics(self) -> dict[str, float]:
        e, self._epoch = self._epoch, self._fresh_epoch()
        n = max(1, e["transfers"])
        return {
            "adapter/transfers": e["transfers"],
            "adapter/skipped": e["skipped"],
            "adapter/grad_norm": e["grad_norm"] / max(1, e["updates"]),
            "adapter/lr": next(iter(self.optimizers.values())).param_groups[0]["lr"],
            "adapter/generate_ms": 1000 * e["generate_s"] / n,
            "adapter/update_ms": 1000 * e["update_s"] / n,
        }

    def state_dict(self) -> dict:
        return {"adapters": self.adapters.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "rng": self.rng, "cuda_rng": self.cuda_rng, "bad_streak": dict(self.bad_streak),
                "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.adapters.load_state_dict(state["adapters"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
            self.schedulers[k].load_state_dict(state["schedulers"][k])
        self.rng = state["rng"]
        self.cuda_rng = state.get("cuda_rng")
        self.bad_streak.update(state["bad_streak"])
        self.totals.update(state["totals"])
        self.pending.clear()
        a = self.opts.adapter  # follow the current options (PBT may have changed lr / decay)
        for k, opt in self.optimizers.items():
            sched = self.schedulers[k]
            sched.base_lrs = [a.lr for _ in opt.param_groups]
            for group, lam in zip(opt.param_groups, sched.lr_lambdas):
                group["lr"] = a.lr * lam(sched.last_epoch)
                if group["weight_decay"]:
                    group["weight_decay"] = a.weight_decay


class Exchange:
    """The put / get / feedback protocol around one :class:`AdapterHub` (thread-safe).

    ``put`` stores a role's matrices for a step; once a step's inputs are complete the
    adapter generates that step's outputs. ``get`` returns, for the links a role receives,
    the newest generated output that role has not used yet whose step is at least
    ``step - staleness_steps``, waiting for one if needed. Older unused outputs are dropped.
    ``feedback`` is keyed by the step the output was generated at.

    ``staleness_steps = 0`` (sync): the put that completes the inputs generates inline and
    ``feedback`` updates inline, so ``get`` returns exactly the output for ``step`` and every
    update lands before the next generation -- the single-process engine's semantics.

    ``staleness_steps = k * t_cycle`` (async): generation and updates run in order on a
    background thread of the exchange; ``put`` and ``feedback`` only enqueue. A receiver's
    ``get`` takes the newest unused output at most ``k`` transfers old if there is one; if
    there is none but the output it wrote last is itself at most ``k`` transfers old, it
    returns no output (the role trains on without a write this step) instead of waiting; it
    waits only when the adapter has fallen more than ``k`` transfers behind. In steady state
    the receiver therefore writes, at each transfer, the output generated from the previous
    transfer's factors while it trained, and never waits. Each output is generated from a detached copy
    of the adapter's parameters (``AdapterHub.generate(snapshot=True)``), so its update may
    follow other updates. Results then depend on timing and are not bit-reproducible.
    """

    def __init__(self, hub: AdapterHub, staleness_steps: int = 0, timeout_s: float = 600.0):
        self.hub = hub
        self.links = list(hub.links.values())
        self.receivers = {l.receiver for l in self.links}
        self.staleness_steps = staleness_steps
        self.timeout_s = timeout_s
        self._cv = threading.Condition()
        self._inbox: dict[int, dict[tuple[str, str], Tensor]] = {}
        self._ready: dict[int, dict[str, Tensor | None]] = {}
        self._taken: dict[int, set[str]] = {}
        self._error: BaseException | None = None
        self._expected = {(l.id, side) for l in self.links for side in ("x", "y")}
        self.background = staleness_steps > 0
        self._jobs: deque[tuple] = deque()
        self._busy = False
        self._last_used: dict[str, int] = {}
        if self.background:
            threading.Thread(target=self._work, name="mergenet-adapter", daemon=True).start()

    # ------------------------------------------------------------------ protocol
    def put(self, step: int, mats: dict[tuple[str, str], Tensor]) -> None:
        with self._cv:
            self._raise_error()
            box = self._inbox.setdefault(step, {})
            box.update(mats)
            if not self._expected <= box.keys():
                return
            del self._inbox[step]
            inputs = {l.id: (box[(l.id, "x")], box[(l.id, "y")]) for l in self.links}
            if self.background:
                self._jobs.append(("generate", step, inputs))
                self._cv.notify_all()
                return
            try:
                self._publish(step, self.hub.generate(step, inputs))
            except BaseException as e:  # noqa: BLE001 - surfaced to every waiting role
                self._error = e
                raise
            finally:
                self._cv.notify_all()

    def get(self, step: int, role: str) -> tuple[int, dict[str, Tensor | None]]:
        """``(generation step, {link id: new matrix or None})`` for the links ``role`` receives."""
        floor = step - self.staleness_steps

        def fresh() -> list[int]:
            return [s for s in self._ready if s >= floor and role not in self._taken[s]]

        with self._cv:
            self._raise_error()
            if self.background and not fresh() and self._last_used.get(role, floor - 1) >= floor:
                return self._last_used[role], {}  # nothing new yet, and the last one is recent enough
            ok = self._cv.wait_for(lambda: self._error is not None or fresh(), self.timeout_s)
            self._raise_error()
            if not ok:
                raise TimeoutError(f"exchange: no adapter output for step >= {floor} within {self.timeout_s}s")
            use = max(fresh())
            self._last_used[role] = use
            out = {l.id: self._ready[use][l.id] for l in self.links if l.receiver == role}
            for s in [s for s in self._ready if s <= use and role not in self._taken[s]]:
                self._taken[s].add(role)
                if s != use:  # an older output this role skips: free its graph
                    for lid in out:
                        self.hub.pending.pop((s, lid), None)
            for s in [s for s in self._ready if self._taken[s] >= self.receivers]:
                del self._ready[s], self._taken[s]
            return use, out

    def feedback(self, gen_step: int, grads: dict[str, Tensor], epoch: int) -> None:
        with self._cv:
            self._raise_error()
            if self.background:
                self._jobs.append(("update", gen_step, grads, epoch))
                self._cv.notify_all()
            else:
                self.hub.update(gen_step, grads, epoch)

    # ------------------------------------------------------------------ internals
    def _publish(self, step: int, out: dict[str, Tensor | None]) -> None:
        self._ready[step] = out
        self._taken[step] = set()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        """Background thread (async): run the queued generations and updates in order."""
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._jobs))
                job = self._jobs.popleft()
                self._busy = True
            try:
                if job[0] == "generate":
                    out = self.hub.generate(job[1], job[2], snapshot=True)
                    with self._cv:
                        self._publish(job[1], out)
                else:
                    self.hub.update(job[1], job[2], job[3])
            except BaseException as e:  # noqa: BLE001 - surfaced to the roles' next call
                with self._cv:
                    self._error = e
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _idle(self) -> None:
        """Wait (holding the lock) until the background thread has nothing left to do."""
        if self.background and not self._cv.wait_for(lambda: not self._jobs and not self._busy, self.timeout_s):
            raise TimeoutError(f"exchange: adapter still busy after {self.timeout_s}s")
        self._raise_error()

    # hub passthroughs (also the Ray actor's API); they see every queued update applied
    def take_epoch_metrics(self) -> dict[str, float]:
        with self._cv:
            self._idle()
            return self.hub.take_epoch_metrics()

    def state_dict(self) -> dict:
        with self._cv:
            self._idle()
            return self.hub.state_dict()

    def load_state_dict(self, state: dict) -> None:
        with self._cv:
            self._error = None
            self._idle()
            self.hub.load_state_dict(state)
            self._inbox.clear()
            self._ready.clear()
            self._taken.clear()
            self._jobs.clear()
            self._last_used.clear()
            self._error = None
