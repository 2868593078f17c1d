"""The emulated Daytona SSH gateway: token-as-user-name auth, direct-tcpip into that sandbox only.

A forward to ``localhost``/``127.0.0.1`` port N is relayed to port N on the sandbox's own
loopback through :meth:`IsolatedSandbox.open_port`; nothing on the emulator's host is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import asyncssh

if TYPE_CHECKING:
    from sandboxnb.testing.daytona_emulator.emulator import DaytonaEmulator

log = logging.getLogger("sandboxnb.testing.daytona_emulator.ssh")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class _Relay(asyncssh.SSHTCPSession):
    """Bridges one SSH channel and one stream into the sandbox."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._chan: Any = None
        self._pump: asyncio.Task | None = None

    def connection_made(self, chan: Any) -> None:
        self._chan = chan
        self._pump = asyncio.ensure_future(self._downstream())

    async def _downstream(self) -> None:
        try:
            while data := await self._reader.read(65536):
                self._chan.write(data)
            self._chan.write_eof()
        except (OSError, asyncssh.Error):
            pass
        except asyncio.CancelledError:
            return
        with contextlib.suppress(Exception):
            self._chan.close()

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._writer.write(data)

    def eof_received(self) -> bool:
        with contextlib.suppress(OSError):
            self._writer.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self._writer.close()


class _GatewayServer(asyncssh.SSHServer):
    def __init__(self, emu: DaytonaEmulator) -> None:
        self._emu = emu
        self._sandbox_id: str | None = None

    def begin_auth(self, username: str) -> bool:
        tok = self._emu.ssh_tokens.get(username)
        if tok is not None and tok.valid():
            self._sandbox_id = tok.sandbox_id
            return False  # the token is the credential: no further auth
        self._emu.ssh_auth_failures += 1
        log.info("ssh gateway: refused an unknown, revoked or expired token")
        return True  # demand auth that cannot succeed

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        if self._sandbox_id is None or dest_host.lower() not in _LOOPBACK:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"only forwards to the sandbox's own loopback are allowed, not {dest_host}")
        return self._open(dest_port)

    async def _open(self, port: int) -> _Relay:
        sb = self._emu.sandboxes.get(self._sandbox_id or "")
        if sb is None or sb.isolated is None or not sb.isolated.alive:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "sandbox is not running")
        try:
            reader, writer = await sb.isolated.open_port(port)
        except (ConnectionRefusedError, OSError) as err:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(err)) from None
        self._emu.ssh_forwards.append((sb.id, port))
        return _Relay(reader, writer)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # no remote forwards

    def session_requested(self) -> bool:
        return False  # no shells: only forwards are emulated


async def start_gateway(emu: DaytonaEmulator) -> asyncssh.SSHAcceptor:
    """Listen on 127.0.0.1 (port 0); the port is ``acceptor.sockets[0].getsockname()[1]``."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    return await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[key], server_factory=lambda: _GatewayServer(emu),
        allow_scp=False, agent_forwarding=False, x11_forwarding=False, login_timeout=30,
    )
