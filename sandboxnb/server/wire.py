"""The sandboxnb wire format: newline-delimited JSON-RPC 2.0, protocol version 1.

Every frame is one JSON object on one line (UTF-8, ASCII-escaped, so a frame never contains a raw
newline). A connection starts with ``auth {token, protocol}``; afterwards the client sends requests
(``exec``, ``python``, ...) and the server answers each with a response carrying the same ``id``,
possibly preceded by ``output {id, stream, data}`` notifications while the request runs.

Stdlib only and Python >= 3.9: this module ships inside the sandbox server bundle; the client
imports it too (``from sandboxnb.server import wire``).
"""

from __future__ import annotations

import json

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs import time inside the sandbox
    from typing import Any

__all__ = [
    "AUTH_FAILED",
    "AUTH_REQUIRED",
    "CANCELLED",
    "FILE_ERROR",
    "FILE_TOO_LARGE",
    "FRAME_TOO_LARGE",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_FILE_BYTES",
    "MAX_FRAME_BYTES",
    "METHODS",
    "METHOD_NOT_FOUND",
    "NAMESPACE_RESET",
    "PARSE_ERROR",
    "PROTOCOL_MISMATCH",
    "PROTOCOL_VERSION",
    "REMOTE_EXCEPTION",
    "TIMEOUT",
    "FrameError",
    "decode",
    "encode",
    "error_name",
    "error_response",
    "notification",
    "request",
    "response",
]

PROTOCOL_VERSION = 1
#: Largest frame (one line, newline included) either side accepts by default.
MAX_FRAME_BYTES = 32 * 1024 * 1024
#: Largest frame a connection may send before it has authenticated (the auth frame is small).
MAX_AUTH_FRAME_BYTES = 4096
#: Default deadline for a whole handshake: connect to a complete auth frame, however it drips in.
HANDSHAKE_TIMEOUT_S = 5.0
#: Largest file ``write_file``/``read_file`` move in one call (base64 must still fit one frame).
MAX_FILE_BYTES = 16 * 1024 * 1024
#: The longest timeout a request may carry (30 days); inf and nan are refused too.
MAX_TIMEOUT_S = 30 * 24 * 3600.0

METHODS = ("auth", "ping", "exec", "cancel", "write_file", "read_file", "python", "shutdown")

# JSON-RPC 2.0 standard codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# sandboxnb codes (implementation-defined server error range).
AUTH_REQUIRED = -32001
AUTH_FAILED = -32002
FRAME_TOO_LARGE = -32003
TIMEOUT = -32004
CANCELLED = -32005
REMOTE_EXCEPTION = -32006
PROTOCOL_MISMATCH = -32007
FILE_ERROR = -32008
FILE_TOO_LARGE = -32009
NAMESPACE_RESET = -32010

_NAMES = {
    PARSE_ERROR: "parse error",
    INVALID_REQUEST: "invalid request",
    METHOD_NOT_FOUND: "method not found",
    INVALID_PARAMS: "invalid params",
    INTERNAL_ERROR: "internal error",
    AUTH_REQUIRED: "auth required",
    AUTH_FAILED: "auth failed",
    FRAME_TOO_LARGE: "frame too large",
    TIMEOUT: "timeout",
    CANCELLED: "cancelled",
    REMOTE_EXCEPTION: "remote exception",
    PROTOCOL_MISMATCH: "protocol mismatch",
    FILE_ERROR: "file error",
    FILE_TOO_LARGE: "file too large",
    NAMESPACE_RESET: "namespace reset",
}

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_loads = json.loads


class FrameError(ValueError):
    """A frame could not be encoded or decoded; ``code`` is the JSON-RPC error code to answer."""

    def __init__(self, code: int, message: str, id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


def error_name(code: int) -> str:
    """Human name of an error code (``"auth failed"``), or ``"error <code>"``."""
    return _NAMES.get(code, f"error {code}")


def encode(message: dict[str, Any], max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Serialise one message to a frame (newline-terminated bytes); FrameError if too large."""
    data = _dumps(message).encode("ascii") + b"\n"
    if len(data) > max_bytes:
        raise FrameError(
            FRAME_TOO_LARGE,
            f"frame of {len(data)} bytes exceeds the limit of {max_bytes} bytes",
            message.get("id"),
        )
    return data


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Parse and validate one frame. Raises FrameError with the code to answer."""
    if len(frame) > max_bytes:
        raise FrameError(
            FRAME_TOO_LARGE, f"frame of {len(frame)}+ bytes exceeds the limit of {max_bytes} bytes"
        )
    try:
        message = _loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(PARSE_ERROR, f"frame is not valid JSON: {exc}") from None
    except RecursionError:
        raise FrameError(PARSE_ERROR, "frame is not valid JSON: nested too deeply") from None
    if not isinstance(message, dict):
        raise FrameError(
            INVALID_REQUEST, f"frame must be a JSON object, got {type(message).__name__}"
        )
    msg_id = message.get("id")
    if message.get("jsonrpc") != "2.0":
        raise FrameError(INVALID_REQUEST, 'frame must carry "jsonrpc": "2.0"', msg_id)
    if msg_id is not None and not isinstance(msg_id, (int, str)):
        raise FrameError(INVALID_REQUEST, f"id must be an integer or string, got {msg_id!r}")
    if "method" in message:
        if not isinstance(message["method"], str):
            raise FrameError(INVALID_REQUEST, "method must be a string", msg_id)
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            raise FrameError(INVALID_PARAMS, "params must be a JSON object", msg_id)
    elif "result" not in message and "error" not in message:
        raise FrameError(INVALID_REQUEST, "frame is neither a request nor a response", msg_id)
    return message


def request(id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request message (a notification when ``id`` is None)."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if id is not None:
        message["id"] = id
    return message


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """A notification message (no id, no response expected)."""
    return {"jsonrpc": "2.0", "method": method, "params": params}


def response(id: Any, result: Any) -> dict[str, Any]:
    """A success response."""
    return {"jsonrpc": "2.0", "id": id, "result": result}


def error_response(id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    """An error response; ``data`` carries structured detail (traceback, partial output...)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": id, "error": error}
