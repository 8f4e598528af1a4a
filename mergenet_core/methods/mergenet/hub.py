"""The adapter hub: every link's adapter with its own AdamW optimiser and schedule."""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from ...errors import TransferError
from ...training.optim import RngStream, param_groups, reapply_hparams, schedule_lambda
from .adapter import ParameterAdapter, adapter_param_count
from .links import Link
from .options import MergeNetOptions


class AdapterHub:
    """Every link's adapter with its own AdamW optimiser and schedule, plus transfer stats."""

    def __init__(self, opts: MergeNetOptions, shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]],
                 links: list[Link], seed: int, transfers_after_start: int,
                 device: torch.device | str = "cpu"):
        self.opts = opts
        self.links = {l.id: l for l in links}
        self.device = torch.device(device)
        a = opts.adapter
        # the adapter's own RNG stream (init + dropout), leaving every caller's stream untouched
        # (on the CPU for a meta hub)
        self.rng = RngStream(seed, "cpu" if self.device.type == "meta" else self.device, seed_cuda=True)
        adapters = {}
        with self.rng.scope():
            for lid, link in self.links.items():
                try:
                    adapters[lid] = ParameterAdapter(
                        shapes[lid][0], shapes[lid][1], a.layers, a.heads, *a.dropouts, link.pair.output_scale,
                        combine=a.combine, gelu=a.gelu, ln_eps=a.ln_eps, width=a.width, gate=a.gate,
                        anchor=a.anchor, gate_init=a.gate_init)
                except ValueError as e:  # options this link's matrices cannot take (e.g. heads)
                    raise ValueError(f"layer pair {link.index}: {e}") from None
            self.adapters = nn.ModuleDict(adapters).to(self.device)
        self.optimizers, self.schedulers = {}, {}
        # a hub on the meta device (fast validation builds the adapters for their errors) never
        # steps: no optimisers (torch's constructor would import torch._dynamo, seconds)
        for lid, ad in self.adapters.items() if self.device.type != "meta" else ():
            groups = param_groups(ad.parameters(), a.weight_decay)
            try:  # the fused kernel (CPU since torch 2.4, and CUDA): fewer, larger kernels per step
                opt = torch.optim.AdamW(groups, lr=a.lr, fused=True)
            except (RuntimeError, TypeError):
                opt = torch.optim.AdamW(groups, lr=a.lr)
            self.optimizers[lid] = opt
            self.schedulers[lid] = torch.optim.lr_scheduler.LambdaLR(
                opt, schedule_lambda(a.schedule, transfers_after_start))
        self.pending: dict[tuple[int, str], tuple[Tensor, dict | None]] = {}
        self.bad_streak = {lid: 0 for lid in self.links}
        self.totals = {"transfers": 0, "skipped": 0}
        self._epoch = self._fresh_epoch()

    @staticmethod
    def _fresh_epoch() -> dict:
        return {"transfers": 0, "skipped": 0, "grad_norm": 0.0, "update_ratio": 0.0, "updates": 0,
                "generate_s": 0.0, "update_s": 0.0, "links": {}}

    def _link_stats(self, lid: str, new: Tensor, y: Tensor, ad: ParameterAdapter) -> None:
        """Per link and epoch: the cosine of the written matrix with the source matrix the adapter
        saw (``source_cos``, where their shapes match: does the output move toward the source?)
        and the residual gate's value (``gate``, gated adapters)."""
        acc = self._epoch["links"].setdefault(lid, {})
        if new.shape == y.shape:
            cos = torch.nn.functional.cosine_similarity(new.flatten().double(), y.flatten().double(), dim=0)
            s = acc.setdefault("source_cos", [0.0, 0])
            s[0] += float(cos)
            s[1] += 1
        if ad.gated:
            s = acc.setdefault("gate", [0.0, 0])
            s[0] += float(ad.gate.detach())
            s[1] += 1

    def param_counts(self) -> dict[str, int]:
        return {lid: adapter_param_count(ad) for lid, ad in self.adapters.items()}

    def generate(self, step: int, inputs: dict[str, tuple[Tensor, ...]],
                 snapshot: bool = False) -> dict[str, Tensor | None]:
        """Adapter outputs for every link (``None`` where the output was not finite).

        ``snapshot``: run each adapter on a detached copy of its parameters, so that its
        update may come after other updates (async exchange): the gradient is then taken at
        the parameters that generated the output (a delayed gradient, as in asynchronous
        SGD), and an optimiser step in between cannot invalidate the saved graph.
        """
        t0 = time.perf_counter()
        out: dict[str, Tensor | None] = {}
        bf16 = self.opts.adapter.precision == "bf16" and self.device.type == "cuda"
        with self.rng.scope(), torch.autocast(self.device.type if bf16 else "cpu", torch.bfloat16, enabled=bf16):
            for lid, (x, y, *metric) in inputs.items():
                ad = self.adapters[lid]
                ad.train()
                x, y = x.to(self.device, torch.float32), y.to(self.device, torch.float32)
                g = metric[0] if metric else None
                kw = {"reference": x, "metric": None if g is None else g.to(self.device, torch.float32)}
                if snapshot:
                    snap = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in ad.named_parameters()}
                    fresh_scale = hasattr(ad, "scale_initialised") and not bool(ad.scale_initialised)
                    new = torch.func.functional_call(ad, snap, (x, y), kw)
                    if fresh_scale and bool(ad.scale_initialised):  # the first call set the learned scale
                        with torch.no_grad():
                            ad.scale.copy_(snap["scale"])
                else:
                    snap = None
                    new = ad(x, y, **kw)
                new = new.float()  # bf16 autocast: the matrix written stays fp32 (a no-op in fp32)
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
                self._link_stats(lid, new.detach(), y, ad)
                self.pending[(step, lid)] = (new, snap)
                out[lid] = new.detach().clone()
                self._epoch["transfers"] += 1
                self.totals["transfers"] += 1
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
            params = [p for p in self.adapters[lid].parameters() if p.requires_grad]
            norm = nn.utils.clip_grad_norm_(params, self.opts.adapter.grad_clip)
            before = [p.detach().clone() for p in params]
            opt.step()
            with torch.no_grad():  # ||theta_after - theta_before|| / ||theta_before||, one device sync
                moved = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                    torch._foreach_sub([p.detach() for p in params], before))))
                size = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)))
                ratio = (moved / size.clamp_min(1e-12)).item()
            self._epoch["update_ratio"] += ratio
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
            # the adapter's parameter update per step relative to its parameters' norm
            "adapter/update_ratio": e["update_ratio"] / max(1, e["updates"]),
            "adapter/lr": next(iter(self.optimizers.values())).param_groups[0]["lr"],
            "adapter/generate_ms": 1000 * e["generate_s"] / n,
            "adapter/update_ms": 1000 * e["update_s"] / n,
            **{f"transfer/{lid}/{k}": total / max(1, cnt) for lid, acc in e["links"].items()
               for k, (total, cnt) in acc.items()},
        }

    def state_dict(self) -> dict:
        return {"adapters": self.adapters.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                **self.rng.state_dict(), "bad_streak": dict(self.bad_streak),
                "totals": dict(self.totals)}

    def load_state_dict(self, state: dict) -> None:
        self.adapters.load_state_dict(state["adapters"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
            self.schedulers[k].load_state_dict(state["schedulers"][k])
        self.rng.load_state_dict(state)
        self.bad_streak.update(state["bad_streak"])
        self.totals.update(state["totals"])
        self.pending.clear()
        a = self.opts.adapter  # follow the current options (PBT may have changed lr / decay)
        for k, opt in self.optimizers.items():
            reapply_hparams(opt, self.schedulers[k], a.lr, a.weight_decay)
