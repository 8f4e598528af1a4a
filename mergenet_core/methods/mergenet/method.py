"""``mergenet``: learned parameter adapters rewrite target weights every ``t_cycle`` steps.

The method acts at the step's hooks (``mergenet_core/training/step.py``), the same on every host:
``before_step`` (a transfer step: every role puts its matrices, then every receiving role gets
the adapter's output and writes it in place), ``after_backward`` (the task loss's gradient
with respect to each written output) and ``after_step`` (the feedback the update rule needs).
A host with both roles runs them for both, a host with one role (a Ray worker) for its own,
talking to the adapters through an object with the :class:`~.exchange.Exchange` API (the
exchange itself, or a proxy to an actor holding it).
"""
from __future__ import annotations

import time

import torch

from ...errors import ConfigError, short
from ...lowrank import make_encoding, rms
from ...training.roles import derive_seed
from ..base import Method, Note, Roles
from .exchange import Exchange
from .hub import AdapterHub
from .links import exact_grad, make_links
from .options import MergeNetOptions

#: adapter numbers every epoch (the hub's), and the receiving target's transfer numbers
ADAPTER_METRICS = ("adapter/transfers", "adapter/skipped", "adapter/grad_norm", "adapter/update_ratio",
                   "adapter/lr", "adapter/generate_ms", "adapter/update_ms")
TRANSFER_METRICS = tuple(f"target/transfer_{k}" for k in ("steps", "writes", "age_steps", "wait_ms"))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine of two feedback matrices; ``None`` when either is zero (nothing to compare)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return float((a.flatten().double() @ b.flatten().double()) / (na * nb))


def scramble_entries(y: torch.Tensor, seed: int) -> torch.Tensor:
    """``y`` with its entries moved by one fixed permutation over all ``P * Q`` positions
    (``control: shuffled_source``): the same values (same distribution and RMS), no row or column
    structure. A permutation of rows and one of columns would not do: the adapter reads the source
    as attention keys and values without positions, so permuting its rows permutes tokens (no
    effect) and permuting its columns equals permuting the input columns of ``fc_k``/``fc_v``,
    whose initialisation is i.i.d. -- the real arm under another adapter initialisation
    (docs/METHOD.md, "Controls"). An entry permutation mixes values across rows and columns, so
    no relabelling of the adapter's weights undoes it."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.numel(), generator=g).to(y.device)
    return y.reshape(-1)[perm].reshape(y.shape)


def _adapter_error(e: ValueError) -> ConfigError:
    """An adapter the options cannot build (e.g. more heads than its width), as a config error."""
    field = ("method.options.adapter.heads" if "heads" in str(e) else
             "method.options.adapter.anchor" if "anchor" in str(e) else "method.options")
    return ConfigError(field, short(str(e), 160))


#: fp32 weights, gradients and Adam's two moments
ADAPTER_BYTES_PER_PARAM = 16


def device_memory(device: torch.device, configured: str) -> tuple[str, int] | None:
    """(what, bytes) of memory on ``device``; for the ``meta`` device of fast validation, on the
    device the config names (None when this machine has no such device: nothing to check)."""
    import os

    if device.type == "meta":
        cuda = configured == "cuda" or (configured == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if cuda else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(device)
        return f"the GPU ({props.name})", int(props.total_memory)
    if device.type == "cpu":
        return "this machine's memory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


class MergeNet(Method):
    Options = MergeNetOptions
    epoch_metric_names = ADAPTER_METRICS + TRANSFER_METRICS

    def __init__(self, options: MergeNetOptions, cfg):
        super().__init__(options, cfg)
        self.links = make_links(options)
        self.enc: dict[tuple[str, str], object] = {}
        self.exchange = None
        self.written: dict[str, object] = {}  # link id -> (encoding, output written, generation step)
        self._task: dict[str, dict] = {}  # role -> {link id: dL/dA'} of this step (after_backward)
        self.steps_per_epoch = 1
        self._recv: dict[str, list[float]] = {}  # receiving role -> [gets, writes, age steps, wait s]
        self._diag: dict[str, list[float]] = {}  # metric name -> [sum, count]
        self._noise: dict[str, torch.Generator] = {}  # noise_source control: one stream per link

    @classmethod
    def check_config(cls, cfg, options: MergeNetOptions) -> list[str]:
        if not options.self_transfer and cfg.source is None:
            return [str(ConfigError("source", "method 'mergenet' needs a source model (or self_transfer: true)"))]
        return cls._shared_weights(options)

    @staticmethod
    def _shared_weights(opts: MergeNetOptions) -> list[str]:
        """Two layer pairs that use the same weight of one role must encode it the same way
        (``mode``, ``rank``, ``alpha``, ``align``): the encoding is built once per weight, so the
        second pair's settings would otherwise be ignored silently."""
        src_role = "target" if opts.self_transfer else "source"
        names = ("mode", "rank", "alpha", "align")
        seen: dict[tuple[str, str], tuple[int, tuple]] = {}
        lines = []
        for i, lp in enumerate(opts.layer_pairs):
            enc = (lp.mode, lp.rank, lp.alpha, lp.align)
            for role, param in ((src_role, lp.source), ("target", lp.target)):
                if (role, param) not in seen:
                    seen[(role, param)] = (i, enc)
                    continue
                j, other = seen[(role, param)]
                if other != enc:
                    what = next(n for n, a, b in zip(names, enc, other) if a != b)
                    lines.append(f"method.options.layer_pairs.{i}.{what}: {role} weight '{param[:60]}' is also "
                                 f"paired in layer_pairs.{j} with {what} {dict(zip(names, other))[what]}; "
                                 "pairs sharing a weight must encode it the same way")
        return lines

    @classmethod
    def roles(cls, options: MergeNetOptions | None = None) -> Roles:
        """Source and target may run apart (they talk only through the exchange); a
        self-transfer has one role; a frozen source does not train; the untrained-source
        control keeps the source at its seed's initialisation (``source.init_from`` not loaded)."""
        if options is None:
            return Roles(untrained=("source",), apart=True)
        one = options.self_transfer
        return Roles(needed=("target",) if one else ("source", "target"),
                     trained=("target",) if options.source_frozen or one else ("source", "target"),
                     untrained=("source",) if options.control == "untrained_source" else (), apart=not one)

    # ------------------------------------------------------------------ set-up
    def setup(self, roles: dict) -> None:
        decl = self.roles(self.options)
        frozen = set(decl.needed) - set(decl.trained)
        for link in self.links:
            lp = link.pair
            for role, param, side in link.ends():
                if role in roles and (role, param) not in self.enc:
                    mode = lp.mode
                    if mode == "learned" and role in frozen:
                        # a frozen provider keeps its dense (possibly trained) weight: its factors
                        # are read by SVD instead of truncating the layer to rank r
                        mode = "svd"
                    self.enc[(role, param)] = make_encoding(
                        roles[role].model, param, mode, lp.rank, lp.alpha,
                        field=f"method.options.layer_pairs.{link.index}.{side}", align=lp.align)
            if link.receiver in roles:  # a written weight that stays dense must train (the exact rule's gradient)
                p = dict(roles[link.receiver].model.named_parameters()).get(link.receiver_param)
                if p is not None and not p.requires_grad and link.receiver not in frozen:
                    raise ConfigError(f"{link.receiver}.train", f"'{link.receiver_param}' is written by "
                                      f"layer_pairs.{link.index} but does not train; add it to {link.receiver}.train")

    def config_warnings(self, roles: dict) -> list[str]:
        """An unscaled write (``output_scale: none``) in svd or learned mode (docs/METHOD.md,
        "Scale rule"); a layer pair whose receiving layer has no normalisation after it: every
        write changes that layer's output scale directly (docs/METHOD.md, "Safe layer pairs")."""
        from ...models.inspect import normalised_layers

        out, normed = [], {}
        if self.exchange is not None and hasattr(self.exchange, "hub"):
            n, need = self.adapter_size()
            out.append(Note(f"method.options.adapter: {len(self.links)} adapter(s), {n:,} trainable parameters, "
                            f"~{need / 2**20:,.0f} MiB to train (fp32 weights, gradients, Adam moments)"))
        for i, lp in enumerate(self.options.layer_pairs):
            if lp.output_scale == "none" and lp.mode in ("svd", "learned"):
                out.append(f"method.options.layer_pairs.{i}.output_scale: 'none' with mode {lp.mode} writes the "
                           "adapter's LayerNorm output (row norm ~ sqrt(columns)) whatever the layer's scale, "
                           "inflating its rank-r part at every write; use rms (the default)")
        for link in self.links:
            if link.receiver not in roles:
                continue
            if link.receiver not in normed:
                normed[link.receiver] = normalised_layers(roles[link.receiver].model)
            layer = link.receiver_param.rpartition(".")[0]
            if layer not in normed[link.receiver]:
                side = "source" if link.reverse else "target"
                out.append(f"method.options.layer_pairs.{link.index}.{side}: '{link.receiver_param}' has no "
                           "normalisation layer after it; adapter writes rescale its output directly "
                           "(prefer a BatchNorm/LayerNorm-followed layer: mergenet pairs)")
        return out

    def link_shapes(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """(receiver matrix shape, provider matrix shape) per link; needs both roles set up."""
        return {l.id: (tuple(self.enc[(l.receiver, l.receiver_param)].shape),
                       tuple(self.enc[(l.provider, l.provider_param)].shape)) for l in self.links}

    def transfers_after_start(self, steps_per_epoch: int) -> int:
        epochs = self.cfg.target.recipe.epochs
        start = min(self.options.adapter.hold_epochs, epochs)
        t = self.options.t_cycle
        first = -(-start * steps_per_epoch // t) * t  # first transfer step (k % t_cycle == 0) from the start epoch on
        return len(range(first, epochs * steps_per_epoch, t))

    def make_hub(self, steps_per_epoch: int, device="cpu", shapes: dict | None = None) -> AdapterHub:
        """The adapters for every link; ``shapes`` lets a process without the models build it."""
        return AdapterHub(self.options, shapes or self.link_shapes(), self.links,
                          derive_seed(self.cfg.seed, "adapter"), self.transfers_after_start(steps_per_epoch), device)

    def ready(self, roles: dict, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        if self.exchange is None and all(r in roles for r in self.roles(self.options).needed):
            try:
                self.exchange = Exchange(self.make_hub(steps_per_epoch, roles["target"].device))
            except ValueError as e:  # e.g. more heads than the adapter's width allows
                raise _adapter_error(e) from None
            self._check_adapter_fits(roles["target"].device)

    def adapter_size(self) -> tuple[int, int]:
        """(trainable adapter parameters over every link, bytes to train them: fp32 weights,
        gradients and the two Adam moments); needs :meth:`ready`."""
        n = sum(self.exchange.hub.param_counts().values())
        return n, n * ADAPTER_BYTES_PER_PARAM

    def _check_adapter_fits(self, device: torch.device) -> None:
        """Refuse adapters that cannot train in the memory of the device they are placed on (the
        target's; in fast validation, the one ``device`` names, when this machine has it)."""
        budget = device_memory(device, self.cfg.device)
        n, need = self.adapter_size()
        if budget is not None and need > budget[1]:
            raise ConfigError("method.options.adapter", f"the adapters ({n:,} parameters) need ~{need / 2**30:.1f} GiB "
                              f"to train but {budget[0]} has {budget[1] / 2**30:.1f} GiB: fewer layers or heads, "
                              "a smaller rank, or preset clean")

    def exchange_spec(self) -> dict:
        """The link shapes: all a process without the models needs to build the adapters."""
        return {"shapes": self.link_shapes()}

    def build_exchange(self, spec: dict, steps_per_epoch: int, device: str = "cpu", staleness: int = 0) -> Exchange:
        """``staleness`` in transfers; the exchange counts steps (``t_cycle`` per transfer)."""
        return Exchange(self.make_hub(steps_per_epoch, device, spec["shapes"]),
                        staleness_steps=staleness * self.options.t_cycle)

    def attach(self, exchange) -> None:
        """Use an external exchange (the Ray adapter actor's proxy)."""
        self.exchange = exchange

    # ------------------------------------------------------------------ the step's hooks
    def is_transfer(self, step: int) -> bool:
        return step % self.options.t_cycle == 0

    def before_step(self, step: int, roles: dict) -> None:
        """A transfer step: every role's ``put``, then every role's ``get`` (and in-place write)."""
        if self.is_transfer(step):
            for r in roles.values():
                self._put(step, r)
            for r in roles.values():
                self._get(step, r)

    def after_backward(self, step: int, role) -> None:
        """dL/dA' of this step's task loss for each output ``role`` wrote (the exact rule's
        feedback, and the yardstick the feedback is measured against whichever rule is used)."""
        self._task[role.name] = {lid: exact_grad(enc) for lid, (enc, _, _) in self._written_into(role).items()}

    def after_step(self, step: int, role) -> None:
        """Feed back what the update rule needs for the outputs ``role`` wrote this step (if it
        trained; exact: the task gradient, delta: ``A' - A`` after its optimiser step), then
        forget them."""
        mine = self._written_into(role)
        task = self._task.pop(role.name, None)
        grads = {}
        if task is not None:
            if self.options.update_rule == "exact":
                grads = task
            else:
                grads = {lid: enc.delta(new) for lid, (enc, new, _) in mine.items()}
            for lid, g in grads.items():
                self._note(f"transfer/{lid}/feedback_cos", _cosine(g, task[lid]))
        for lid in mine:
            del self.written[lid]
        by_gen: dict[int, dict] = {}
        for lid, g in grads.items():
            by_gen.setdefault(mine[lid][2], {})[lid] = g
        for gen_step, g in by_gen.items():
            self.exchange.feedback(gen_step, g, step // self.steps_per_epoch)

    def _written_into(self, role) -> dict:
        return {lid: v for lid, v in self.written.items()
                if next(l for l in self.links if l.id == lid).receiver == role.name}

    def _put(self, step: int, role) -> None:
        mats = {}
        for l in self.links:
            if l.provider == role.name:
                enc = self.enc[(role.name, l.provider_param)]
                y = enc.read()
                self._note(f"transfer/{l.id}/provider_factor_cos", enc.last_row_cos)
                mats[(l.id, "y")] = self._control(l, y)
            if l.receiver == role.name:
                enc = self.enc[(role.name, l.receiver_param)]
                mats[(l.id, "x")] = enc.read()
                g = enc.scale_metric()  # after read: svd factors are taken there
                if g is not None:
                    mats[(l.id, "g")] = g
                self._note(f"transfer/{l.id}/receiver_factor_cos", enc.last_row_cos)
        if mats:
            self.exchange.put(step, mats)

    def _control(self, link, y):
        """The provider matrix the adapter sees under ``options.control`` (forward links only)."""
        c = self.options.control
        if c in ("none", "untrained_source") or link.reverse:
            return y
        if c == "shuffled_source":
            return scramble_entries(y, derive_seed(self.cfg.seed, "shuffle", link.id))
        g = self._noise.get(link.id)
        if g is None:
            g = self._noise[link.id] = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "noise", link.id))
        noise = torch.randn(y.shape, generator=g, dtype=torch.float32).to(y.device, y.dtype)
        return noise * (rms(y) / rms(noise).clamp_min(1e-12))

    def _note(self, key: str, value: float | None) -> None:
        if value is not None:
            acc = self._diag.setdefault(key, [0.0, 0])
            acc[0] += value
            acc[1] += 1

    def _get(self, step: int, role) -> None:
        if not any(l.receiver == role.name for l in self.links):
            return
        t0 = time.perf_counter()
        gen_step, outs = self.exchange.get(step, role.name)
        st = self._recv.setdefault(role.name, [0, 0, 0, 0.0])
        st[0] += 1
        st[3] += time.perf_counter() - t0
        if any(v is not None for v in outs.values()):
            st[1] += 1
            st[2] += step - gen_step
        for lid, new in outs.items():
            if new is None:
                continue
            link = next(l for l in self.links if l.id == lid)
            enc = self.enc[(role.name, link.receiver_param)]
            new = new.to(role.device)
            enc.write(new)
            self._note(f"transfer/{lid}/write_change", enc.last_write_change)
            self.written[lid] = (enc, new, gen_step)

    # ------------------------------------------------------------------ metrics / state
    def role_metrics(self) -> dict[str, float]:
        """For each receiving role: transfer steps, steps that wrote an adapter output, mean age
        of the written output in steps (0 in sync mode) and mean wait for it in ``get``."""
        out = {}
        for name, (gets, writes, age, wait) in self._recv.items():
            out.update({f"{name}/transfer_steps": gets, f"{name}/transfer_writes": writes,
                        f"{name}/transfer_age_steps": age / max(1, writes),
                        f"{name}/transfer_wait_ms": 1000 * wait / max(1, gets)})
        self._recv.clear()
        # per link: mean row cosine of consecutive reads of the receiver's / provider's factors,
        # and the relative change ||W_after - W_before|| / ||W_before|| each write made
        out.update({k: total / max(1, n) for k, (total, n) in self._diag.items()})
        self._diag.clear()
        return out

    def epoch_metrics(self) -> dict[str, float]:
        return self.exchange.take_epoch_metrics() if self.exchange is not None else {}

    def state_dict(self, role: str | None = None) -> dict:
        """The adapters (the exchange's hub); with ``role``: that role's side of the transfer,
        its encodings' alignment state and noise streams."""
        if role is None:
            return {"hub": self.exchange.state_dict()} if self.exchange is not None else {}
        encs = {p: e.state_dict() for (r, p), e in self.enc.items() if r == role}
        noise = {lid: g.get_state() for lid, g in self._noise.items()
                 if next(l for l in self.links if l.id == lid).provider == role}
        return {"encodings": encs, "noise": noise}

    def load_state_dict(self, state: dict, role: str | None = None) -> None:
        if role is None:
            if state and self.exchange is not None:
                self.exchange.load_state_dict(state["hub"])
            return
        for p, st in (state or {}).get("encodings", {}).items():
            if (role, p) in self.enc:
                self.enc[(role, p)].load_state_dict(st)
        for lid, st in (state or {}).get("noise", {}).items():
            self._noise[lid] = torch.Generator()
            self._noise[lid].set_state(st)
