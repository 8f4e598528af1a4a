"""MergeNet's options: layer pairs, the adapter and the transfer cycle (validated by pydantic)."""
from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PositiveInt, model_validator


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
    gate_init: float = Field(0.0, allow_inf_nan=False, description="the gate's initial value (gate: true); "
                                                                   "1 with anchor: source = the first write "
                                                                   "copies the source's matrix")
    anchor: Literal["target", "source"] = Field(
        "target", description="target (the method's): the proposal is the adapter's output; source: the source's "
                              "matrix plus a learned departure (from 0) toward the adapter's output, so an untrained "
                              "adapter proposes the source's matrix itself (equal shapes only; docs/METHOD.md)")
    width: PositiveInt | None = Field(None, description="fixed model width: every attention block projects its "
                                                        "tokens to this width (width/heads per head) and the FFN's "
                                                        "hidden layer has this width; default: the authors' "
                                                        "widths (max((d_q+d_kv)//2, 128) and 2q)")
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    ffn_dropout: float = Field(0.2, ge=0, lt=1)
    generate_dropout: bool = Field(True, description="dropout active when generating the written weights "
                                                     "(false: attention and FFN dropout off)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the adapter's forward (generate) under bf16 autocast on a CUDA device "
                            "(parameters, optimiser and the written matrix stay fp32; fp32 on a CPU)")
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
        if self.gate_init != 0 and not self.gate:
            raise ValueError("gate_init: needs gate: true")
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
    update_rule: Literal["exact", "delta"] = Field(
        "exact", description="the adapter's learning signal. exact (default): the gradient of the target's task "
                             "loss with respect to the adapter's output, on the transfer step's batch -- "
                             "independent of the target's optimiser, momentum, weight decay and learning rate. "
                             "delta: the authors' W' - W_after_step (the target optimiser's whole step: "
                             "momentum, weight decay, Adam's normalisation, scaled by the target's LR); "
                             "adapter.preset: authors selects it unless update_rule is set")
    adapter: AdapterOptions = Field(default_factory=AdapterOptions)
    direction: Literal["forward", "both"] = "forward"
    freeze_source: bool = False
    self_transfer: bool = Field(False, description="both parameters live in the target model")
    control: Literal["none", "untrained_source", "shuffled_source", "noise_source"] = Field(
        "none", description="negative controls: untrained_source (the source at its seed's init, frozen), "
                            "shuffled_source (the source factor's entries moved by one fixed permutation over all "
                            "its positions at every transfer: same values, no structure), "
                            "noise_source (source factor replaced by Gaussian noise of the same RMS); with "
                            "self_transfer the provider layer of the target is scrambled the same way")
    max_bad_transfers: PositiveInt = Field(3, description="consecutive non-finite outputs before the run fails")

    @model_validator(mode="before")
    @classmethod
    def _authors_rule(cls, data):
        """``adapter.preset: authors`` also selects the authors' ``delta`` rule; an explicit
        ``update_rule`` wins."""
        if isinstance(data, dict) and "update_rule" not in data:
            adapter = data.get("adapter")
            preset = adapter.get("preset") if isinstance(adapter, dict) else getattr(adapter, "preset", None)
            if preset == "authors":
                return {**data, "update_rule": "delta"}
        return data

    @model_validator(mode="after")
    def _combos(self) -> "MergeNetOptions":
        if self.freeze_source and self.direction == "both":
            raise ValueError("freeze_source: a frozen source cannot receive transfers (direction: both)")
        if self.self_transfer and self.freeze_source:
            raise ValueError("freeze_source: self_transfer has no separate source")
        if self.control == "untrained_source" and self.self_transfer:  # shuffled / noise: the provider layer's
            # factors are permuted or replaced by noise, whichever model holds it
            raise ValueError("control: 'untrained_source' needs a separate source (self_transfer is on; "
                             "shuffled_source or noise_source scramble the provider layer)")
        if self.control == "untrained_source" and self.direction == "both":
            raise ValueError("control: the untrained source is frozen and cannot receive transfers (direction: both)")
        return self

    @property
    def source_frozen(self) -> bool:
        return self.freeze_source or self.control == "untrained_source"
