"""The listening socket: TCP, a Unix socket (owner-only), or one inherited from the launcher."""

from __future__ import annotations

import _socket
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def listen(opts: dict[str, Any]) -> tuple[Any, int | None]:
    """A listening socket for ``opts`` and its TCP port (None for a Unix socket)."""
    if opts["listen_fd"] is not None:  # a listening socket inherited from the launcher
        sock = _socket.socket(fileno=opts["listen_fd"])
        name = sock.getsockname()
        return sock, name[1] if isinstance(name, tuple) else None
    if opts["unix"]:
        path = opts["unix"]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(64)
        return sock, None
    host = opts["host"]
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    sock.bind((host, opts["port"]))
    sock.listen(64)
    return sock, sock.getsockname()[1]
