"""``kd``: Hinton knowledge distillation from the source, trained online beside the target.

The source (teacher) trains on its labels; the target (student) minimises
``(1 - w) * CE + w * T^2 KL(teacher_T || student_T)`` on the same batch. Needs a shared
label space. With ``train_source: false`` the teacher stays as initialised/loaded.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .base import METHODS, Method, Roles, require_same_labels, softened_kl


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
        """Both models on the target's batch (one process); ``train_source: false``: the teacher
        does not train (eval mode, no gradients)."""
        return Roles(trained=("source", "target") if options is None or options.train_source else ("target",),
                     shared_batch="target")

    @classmethod
    def check_config(cls, cfg, options) -> list[str]:
        return super().check_config(cfg, options) or require_same_labels(cfg, "kd")

    def loss(self, role: str, outs: dict):
        """The teacher's cross-entropy; the student's ``(1 - w) * CE + w * KD``."""
        o, out = self.options, outs[role]
        if role == "source":
            return out.ce
        return (1 - o.weight) * out.ce + o.weight * softened_kl(out.logits, outs["source"].logits, o.temperature)
