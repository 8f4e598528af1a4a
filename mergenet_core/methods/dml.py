"""``dml``: deep mutual learning (Zhang et al. 2018) — both models learn from labels and
from each other's predictions (KL at temperature 1) on the same batch.

Both updates use the pre-step predictions of the other model (a simultaneous variant of
the paper's alternating update; one forward per model per step)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .base import METHODS, Method, Roles, require_same_labels, softened_kl


class DMLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0, description="weight of each model's mutual KL term")
    temperature: float = Field(1.0, gt=0)


@METHODS.register("dml")
class DML(Method):
    Options = DMLOptions

    @classmethod
    def roles(cls, options: DMLOptions | None = None) -> Roles:
        """Both models train on the target's batch (one process)."""
        return Roles(shared_batch="target")

    @classmethod
    def check_config(cls, cfg, options) -> list[str]:
        return super().check_config(cfg, options) or require_same_labels(cfg, "dml")

    def loss(self, role: str, outs: dict):
        """Each model's cross-entropy plus its KL to the other's pre-step predictions."""
        o, other = self.options, "target" if role == "source" else "source"
        return outs[role].ce + o.weight * softened_kl(outs[role].logits, outs[other].logits, o.temperature)
