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
    return text(name, value) if isinstance(value, str) else value


def text(name: str, value: str, nul: bool = False) -> str:
    """``value`` unless it holds a lone surrogate or (``nul``) a NUL: no OS string can."""
    if (not value.isascii() and value.encode(errors="replace").decode() != value) or (
            nul and "\0" in value):
        raise ParamError(f"parameter {name} holds a NUL or a lone surrogate")
    return value


def b64(name: str, encoded: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise ParamError(f"parameter {name} is not valid base64: {exc}") from None


def timeout_param(params: dict[str, Any]) -> float | None:
    """The optional ``timeout`` in seconds: > 0 and at most :data:`MAX_TIMEOUT_S`, or None."""
    timeout = param(params, "timeout", (int, float))
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:  # nan fails both comparisons
        raise ParamError(f"parameter timeout = {timeout!r} must be > 0 and <= "
                         f"{MAX_TIMEOUT_S:.0f} seconds (or null)")
    return timeout


def resolve(workdir: str, path: str, name: str = "path") -> str:
    """A request path (parameter ``name``) made absolute: relative to the server's workdir."""
    return os.path.normpath(os.path.join(workdir, os.path.expanduser(text(name, path, True))))
