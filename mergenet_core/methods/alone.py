"""``alone``: the target trained by itself with the same recipe (the reference baseline)."""
from __future__ import annotations

from .base import METHODS, Method, Roles


@METHODS.register("alone")
class Alone(Method):
    @classmethod
    def roles(cls, options=None) -> Roles:
        """The target alone, which may run in its own process."""
        return Roles(needed=("target",), trained=("target",), apart=True)
