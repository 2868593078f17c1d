"""Every exception sandboxnb raises derives from :class:`SandboxnbError`.

Each subclass also derives from the matching builtin, so ``except ValueError`` or
``except TimeoutError`` keep working: a :class:`ConfigError` is a ``ValueError``, a
:class:`SandboxTimeout` and a :class:`StartupTimeout` are ``TimeoutError``. Messages are built
once, final, by the raiser.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectionLost",
    "ProtocolError",
    "ProviderError",
    "RemoteError",
    "RemotePythonError",
    "SandboxError",
    "SandboxTimeout",
    "SandboxnbError",
    "StartupTimeout",
    "UnsupportedFieldError",
]


class SandboxnbError(Exception):
    """The root of every sandboxnb exception."""


class ConfigError(SandboxnbError, ValueError):
    """A configuration value was rejected; the message names field, value and what is accepted."""


class UnsupportedFieldError(ConfigError):
    """A provider was asked for a config field it cannot honour."""

    def __init__(self, provider: str, field: str, value: Any, supported: Any,
                 message: str | None = None) -> None:
        self.provider, self.field, self.value = provider, field, value
        if message is None:
            shown = str(value) if hasattr(value, "model_dump") else repr(value)
            accepted = ", ".join(sorted(supported)) or "none"
            message = (f"{provider} does not support {field} (got {shown}); "
                       f"{provider} honours: {accepted}")
        super().__init__(message)


class ProviderError(SandboxnbError, RuntimeError):
    """A provider failed to acquire, reach or release a sandbox."""


class StartupTimeout(ProviderError, TimeoutError):
    """A sandbox was not ready within ``limits.startup_timeout_s``."""


class SandboxError(SandboxnbError):
    """Base class of every error of a connected sandbox (the client)."""


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
