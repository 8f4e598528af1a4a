"""``alone``: the target trained by itself with the same recipe (the reference baseline)."""
from __future__ import annotations

from .base import METHODS, Method


@METHODS.register("alone")
class Alone(Method):
    uses_source = False
    splittable = True

    def role_step(self, step: int, role) -> None:
        with role.rng_scope():
            role.train_step()
