"""``param_share``: copy the source weight straight into the target (paper, Fig. 1(d)).

Every ``t_cycle`` steps each layer pair's target weight (as a matrix) is replaced by
``(1 - mix) * W_t + mix * P(W_s)``, where ``P`` resizes the source matrix to the target's
shape by bilinear interpolation and rescales it to the target's RMS (identity when the
shapes match and ``rescale`` is off). No learned component: this is the naive baseline the
paper reports as harmful across heterogeneous models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from ..lowrank import conv_to_matrix, make_encoding, rms_rescale
from .base import METHODS, Method


class SharePair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    target: str


class ParamShareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer_pairs: list[SharePair] = Field(min_length=1)
    t_cycle: PositiveInt = 1
    mix: float = Field(1.0, gt=0, le=1, description="1 = replace the target weight")
    rescale: bool = True


def project(src: torch.Tensor, like: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Resize matrix ``src`` to ``like``'s shape (bilinear) and match its RMS."""
    out = src
    if out.shape != like.shape:
        out = F.interpolate(src[None, None], size=tuple(like.shape), mode="bilinear", align_corners=False)[0, 0]
    return rms_rescale(out, like) if rescale else out


@METHODS.register("param_share")
class ParamShare(Method):
    Options = ParamShareOptions

    def setup(self, roles: dict) -> None:
        self.encs = []
        for i, lp in enumerate(self.options.layer_pairs):
            f = f"method.options.layer_pairs.{i}"
            self.encs.append((make_encoding(roles["source"].model, lp.source, "full", field=f"{f}.source"),
                              make_encoding(roles["target"].model, lp.target, "full", field=f"{f}.target")))

    @torch.no_grad()
    def before_step(self, step: int, roles: dict) -> None:
        """Every ``t_cycle`` steps, before both roles' ordinary steps: the copy."""
        if step % self.options.t_cycle == 0:
            for s_enc, t_enc in self.encs:
                w_t = t_enc.read()
                p = project(conv_to_matrix(s_enc.read()).to(w_t), w_t, self.options.rescale)
                t_enc.write((1 - self.options.mix) * w_t + self.options.mix * p)
