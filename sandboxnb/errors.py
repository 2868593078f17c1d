"""Exceptions raised by the sandboxnb client."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ConnectionLost",
    "ProtocolError",
    "RemoteError",
    "RemotePythonError",
    "SandboxError",
    "SandboxTimeout",
]


class SandboxError(Exception):
    """Base class of every sandboxnb client error."""


class AuthenticationError(SandboxError):
    """The server refused the handshake (missing or wrong token, protocol mismatch)."""


class ConnectionLost(SandboxError):
    """The connection to the sandbox server dropped, or stopped answering heartbeats."""


class ProtocolError(SandboxError):
    """The peer sent something that is not valid sandboxnb protocol."""


class SandboxTimeout(SandboxError, TimeoutError):
    """An operation did not finish within its deadline; ``data`` holds server detail if any."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data


class RemoteError(SandboxError):
    """The server answered a request with an error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


class RemotePythonError(SandboxError):
    """Code run with ``Sandbox.python`` raised; ``traceback`` is the remote formatted traceback."""

    def __init__(self, type: str, message: str, traceback: str) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        head = f"{self.type}: {self.message}" if self.message else self.type
        return f"{head}\n\nRemote traceback:\n{self.traceback}" if self.traceback else head
