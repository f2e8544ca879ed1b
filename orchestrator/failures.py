"""A role that fails: :class:`RoleFailure` names it, :func:`get` turns Ray's errors into one."""

from __future__ import annotations

from typing import Any

from shared.runtime import first_line


class RoleFailure(RuntimeError):
    """A role's actor died or raised; ``role`` names it, the message is the cause's first line."""

    def __init__(self, role: str, cause: str, detail: str = ""):
        super().__init__(role, cause, detail)  # args stay (role, cause, detail): the error survives Ray's pickling
        self.role = role
        self.cause = cause
        self.detail = detail  # e.g. the last lines of the actor's log, shown below the one-line error

    def __str__(self) -> str:
        return f"{self.role} failed: {self.cause}"


def get(role: str, refs: Any, timeout: float | None = None, what: str = "", actor: str = "") -> Any:
    """``ray.get`` that turns a dead actor or a raised method into :class:`RoleFailure` naming ``role`` (and
    ``actor``, with its log, when the caller knows which one answered); with ``timeout``, no answer within it (a
    hung role) too, naming ``what`` was asked."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RoleFailure(role, f"no answer to {what or 'a call'} within {timeout:.0f} s") from None
    except ray.exceptions.RayError as e:  # the actor died (killed, out of memory) or its method raised
        raise RoleFailure(role, f"{actor}: {first_line(e)} (see logs/{actor}.log)" if actor else first_line(e)) from None
