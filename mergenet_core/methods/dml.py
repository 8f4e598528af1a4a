"""``dml``: deep mutual learning (Zhang et al. 2018) — both models learn from labels and
from each other's predictions (KL at temperature 1) on the same batch.

Both updates use the pre-step predictions of the other model (a simultaneous variant of
the paper's alternating update; one forward per model per step)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .base import METHODS, Method, softened_kl


class DMLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0, description="weight of each model's mutual KL term")
    temperature: float = Field(1.0, gt=0)


@METHODS.register("dml")
class DML(Method):
    Options = DMLOptions

    @classmethod
    def check_config(cls, cfg, options) -> list[str]:
        return super().check_config(cfg, options) or cls.require_same_labels(cfg, "dml")

    def pair_step(self, step: int, roles: dict) -> None:
        src, tgt = roles["source"], roles["target"]
        o = self.options
        src.model.train()
        tgt.model.train()
        with tgt.rng_scope():
            x, y = tgt.next_batch()
            t_ce, t_logits = tgt.loss(x, y)
        with src.rng_scope():
            s_ce, s_logits = src.loss(x, y)
            src.record(s_ce, s_logits, y)
            src.backward(s_ce + o.weight * softened_kl(s_logits, t_logits, o.temperature))
            src.apply_step()
        with tgt.rng_scope():
            tgt.record(t_ce, t_logits, y)
            tgt.backward(t_ce + o.weight * softened_kl(t_logits, s_logits, o.temperature))
            tgt.apply_step()
