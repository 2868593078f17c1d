"""The provider contract: acquire a sandbox, yield a connectable :class:`Endpoint`, tear it down.

A provider is a small class with a name, the set of config fields it honours, and one async
context manager, :meth:`Provider.sandbox`. Teardown must happen on every exit path: success,
error, timeout and cancellation (``CancelledError`` is a ``BaseException``: use ``finally``).
"""

from __future__ import annotations

import abc
import getpass
import os
import socket
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sandboxnb.config import RuntimeConfig, check_supported

__all__ = ["Availability", "Endpoint", "Provider", "ProviderError", "owner_label"]


def owner_label() -> str:
    """``user@host``: who owns a sandbox, for the labels/tags that let us find it again."""
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class ProviderError(RuntimeError):
    """A provider failed to acquire, reach or release a sandbox."""


@dataclass(frozen=True)
class Endpoint:
    """Where a sandbox's server listens and how to prove we own it.

    ``url`` is ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (an SSH forward appears as a local
    ``tcp://127.0.0.1:PORT``). ``token`` is the per-sandbox secret for the handshake; it is
    excluded from the repr so it never lands in logs or notebook output.
    """

    url: str
    token: str = field(repr=False)
    sandbox_id: str
    provider: str
    config: RuntimeConfig
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Availability:
    """Whether a provider can be used here, and if not, why (and how to fix it)."""

    available: bool
    reason: str = ""


class Provider(abc.ABC):
    """Base class for sandbox providers. Subclasses set ``name`` and ``supported``."""

    name: ClassVar[str]
    #: Dotted config fields the provider honours (``"resources.cpu"``); a group name covers all.
    supported: ClassVar[frozenset[str]]
    description: ClassVar[str] = ""

    def check(self, config: RuntimeConfig) -> RuntimeConfig:
        """Validate ``config`` for this provider before anything starts; return it as used."""
        check_supported(self.name, self.supported, config)
        return config

    @abc.abstractmethod
    def sandbox(self, config: RuntimeConfig) -> AbstractAsyncContextManager[Endpoint]:
        """Acquire a fresh sandbox running the sandbox server; yield its endpoint; release it."""

    @classmethod
    def availability(cls) -> Availability:
        """Report whether the provider is installed and configured on this machine."""
        return Availability(True)

    async def live_sandboxes(self) -> list[str]:
        """Ids of sandboxes of ours this provider can still find (leak checks and ``gc``)."""
        return []

    async def reap(self) -> list[str]:
        """Release every sandbox of this owner the backend still has (``sandboxnb gc``); return
        their ids. Providers whose sandboxes cannot outlive their owner keep this default."""
        return []

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release shared resources (clients, connection pools). Sandboxes are released already."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
