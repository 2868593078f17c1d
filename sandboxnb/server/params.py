"""Request parameter validation: a bad parameter answers ``invalid params`` with its name."""

from __future__ import annotations

import os

from .wire import MAX_TIMEOUT_S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ParamError(ValueError):
    """A request parameter is missing or wrong; the message names it."""


def param(params: dict[str, Any], name: str, types: Any, default: Any = None,
          required: bool = False) -> Any:
    """``params[name]`` checked against ``types`` (a bool is not accepted as an int)."""
    if name not in params or params[name] is None:
        if required:
            raise ParamError(f"missing required parameter {name!r}")
        return default
    value = params[name]
    accepted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        raise ParamError(f"parameter {name} = {value!r} has the wrong type")
    return value


def timeout_param(params: dict[str, Any]) -> float | None:
    """The optional ``timeout`` in seconds: > 0 and at most :data:`MAX_TIMEOUT_S`, or None."""
    timeout = param(params, "timeout", (int, float))
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:  # nan fails both comparisons
        raise ParamError(f"parameter timeout = {timeout!r} must be > 0 and <= "
                         f"{MAX_TIMEOUT_S:.0f} seconds (or null)")
    return timeout


def resolve(workdir: str, path: str) -> str:
    """A request path made absolute: relative paths are relative to the server's workdir."""
    return os.path.normpath(os.path.join(workdir, os.path.expanduser(path)))
