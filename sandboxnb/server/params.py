"""Request parameter validation: a bad parameter answers ``invalid params`` with its name."""

from __future__ import annotations

import os

from .wire import MAX_TIMEOUT_S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Permission bits ``write_file`` sets; setuid, setgid and sticky are refused.
MODE_BITS = 0o777


class ParamError(ValueError):
    """A request parameter is missing or wrong; the message names it."""


def param(params: dict[str, Any], name: str, types: Any, default: Any = None,
          required: bool = False) -> Any:
    """``params[name]`` checked against ``types`` (a bool is not accepted as an int); a string
    must be valid Unicode (a lone surrogate cannot be encoded for the OS)."""
    if name not in params or params[name] is None:
        if required:
            raise ParamError(f"missing required parameter {name!r}")
        return default
    value = params[name]
    accepted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        raise ParamError(f"parameter {name} = {_short(value)} has the wrong type; accepted: "
                         f"{' or '.join(t.__name__ for t in accepted)}")
    if isinstance(value, str):
        check_text(name, value, nul=False)
    return value


def check_text(name: str, value: str, nul: bool = True) -> str:
    """``value`` unless it holds a lone surrogate, or (``nul``) a NUL, which no OS string can."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ParamError(f"parameter {name} = {_short(value)} is not valid Unicode: "
                             f"{exc.reason} at index {exc.start}") from None
    if nul and "\0" in value:
        raise ParamError(f"parameter {name} = {_short(value)} contains a NUL character, which "
                         "no path, argument or environment string can hold")
    return value


def path_param(params: dict[str, Any], workdir: str) -> str:
    """The required ``path``, absolute (relative to ``workdir``), without NUL or surrogates."""
    return resolve(workdir, check_text("path", param(params, "path", str, required=True)))


def mode_param(params: dict[str, Any]) -> int | None:
    """The optional permission ``mode``: 0 to 0o777 (no setuid, setgid or sticky bit)."""
    mode = param(params, "mode", int)
    if mode is not None and not 0 <= mode <= MODE_BITS:
        raise ParamError(f"parameter mode = {_short(mode)} must be permission bits from 0 to "
                         "0o777 (setuid, setgid and sticky bits are refused)")
    return mode


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


def _short(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a parameter may be megabytes long)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of {value.bit_length()} bits>"  # repr of a huge int is slow
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
