"""``kd``: Hinton knowledge distillation from the source, trained online beside the target.

The source (teacher) trains on its labels; the target (student) minimises
``(1 - w) * CE + w * T^2 KL(teacher_T || student_T)`` on the same batch. Needs a shared
label space. With ``train_source: false`` the teacher stays as initialised/loaded.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .base import METHODS, Method, Roles, softened_kl


class KDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(4.0, gt=0)
    weight: float = Field(0.9, ge=0, le=1, description="weight of the KD term")
    train_source: bool = True


@METHODS.register("kd")
class KD(Method):
    Options = KDOptions

    @classmethod
    def roles(cls, options: KDOptions | None = None) -> Roles:
        """Both models on one batch (one process); ``train_source: false``: the teacher does not train."""
        return Roles(trained=("source", "target") if options is None or options.train_source else ("target",))

    @classmethod
    def check_config(cls, cfg, options) -> list[str]:
        return super().check_config(cfg, options) or cls.require_same_labels(cfg, "kd")

    def pair_step(self, step: int, roles: dict) -> None:
        src, tgt = roles["source"], roles["target"]
        o = self.options
        tgt.model.train()
        with tgt.rng_scope():
            x, y = tgt.next_batch()
            ce, logits = tgt.loss(x, y)
        src.model.train(o.train_source)
        with src.rng_scope():
            if o.train_source:
                s_ce, s_logits = src.loss(x, y)
                src.record(s_ce, s_logits, y)
                src.backward(s_ce)
                src.apply_step()
            else:
                import torch

                with torch.no_grad():
                    s_logits = src.loss(x, y)[1]
        with tgt.rng_scope():
            loss = (1 - o.weight) * ce + o.weight * softened_kl(logits, s_logits, o.temperature)
            tgt.record(ce, logits, y)
            tgt.backward(loss)
            tgt.apply_step()
