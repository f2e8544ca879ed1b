"""A role that fails: :class:`RoleFailure` names it, :func:`get` turns Ray's errors into one."""

from __future__ import annotations

from typing import Any

from shared.runtime import first_line


class RoleFailure(RuntimeError):
    """A role's actor died or raised; ``role`` names it, the message is the cause's first line."""

    def __init__(self, role: str, cause: str):
        super().__init__(role, cause)  # args stay (role, cause) so the error survives Ray's pickling
        self.role = role
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.role} failed: {self.cause}"


def get(role: str, refs: Any) -> Any:
    """``ray.get`` that turns a dead actor or a raised method into :class:`RoleFailure` naming ``role``."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayError as e:  # the actor died (killed, out of memory) or its method raised
        raise RoleFailure(role, first_line(e)) from None
