"""Connections before auth, on one poll() thread: bounded in bytes (wire.MAX_AUTH_FRAME_BYTES),
time (the whole handshake, --handshake-timeout) and number (MAX_PENDING; past it, what arrived is
read, then the oldest are evicted). Authenticated ones get a Connection thread.
"""

from __future__ import annotations

import _socket
import _thread
import os
import time
from _operator import _compare_digest

from . import wire as P
from .connection import Connection
from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Most connections held before auth (at most a quarter of the open-file limit).
MAX_PENDING = 1024


class Gate:
    def __init__(self, server: Any, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.lock = _thread.allocate_lock()
        #: [sock, number, deadline, buffer]: accepted, not yet polled
        self.incoming: list[list[Any]] = []
        #: by fd, in deadline order
        self.pending: dict[int, list[Any]] = {}
        self.cap = MAX_PENDING
        self.wake = None

    def admit(self, sock: Any, number: int) -> None:
        sock.setblocking(False)
        with self.lock:
            self.incoming.append([sock, number, time.monotonic() + self.timeout, b""])
            evicted = self.incoming.pop(0) if len(self.incoming) > self.cap else None
        if evicted:
            evicted[0].close()
        try:
            if self.wake is None:
                import resource

                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                if soft > 0:
                    self.cap = max(16, min(MAX_PENDING, soft // 4))
                wake = os.pipe()
                os.set_blocking(wake[1], False)
                try:
                    _thread.start_new_thread(self._run, (wake[0],))
                except RuntimeError:  # no thread to be had: tried again with the next one
                    os.close(wake[0])
                    os.close(wake[1])
                    raise
                self.wake = wake[1]
            os.write(self.wake, b"x")
        except (OSError, RuntimeError) as exc:  # a full pipe: the gate is awake anyway
            if self.wake is None:
                log(f"cannot start the handshake thread: {exc}")

    def _run(self, wake: int) -> None:
        import select

        poller = select.poll()
        poller.register(wake, select.POLLIN)
        while True:
            try:
                self._step(poller, wake)
            except Exception as exc:  # the gate outlives any one connection
                log(f"handshake: {type(exc).__name__}: {exc}")

    def _step(self, poller: Any, wake: int) -> None:
        with self.lock:
            incoming, self.incoming = self.incoming, []
        for entry in incoming:
            fd = entry[0].fileno()
            self.pending[fd] = entry
            poller.register(fd, 1)  # POLLIN
        pending = self.pending
        if len(pending) > self.cap:
            self._poll(poller, wake, 0)  # read what has arrived before evicting anyone
            while len(pending) > self.cap:
                self._drop(poller, next(iter(pending)))
        now = time.monotonic()
        while pending and pending[next(iter(pending))][2] <= now:
            self._drop(poller, next(iter(pending)), None, P.TIMEOUT, f"the handshake did not "
                       f"finish within {self.timeout:g} s; expected auth {{token, protocol}}")
        due = pending and pending[next(iter(pending))][2]
        self._poll(poller, wake, max(0, int((due - now) * 1000) + 1) if due else None)

    def _poll(self, poller: Any, wake: int, wait_ms: int | None) -> None:
        for fd, _events in poller.poll(wait_ms):
            if fd == wake:
                os.read(wake, 4096)
            elif fd in self.pending:
                self._read(poller, fd)

    def _read(self, poller: Any, fd: int) -> None:
        entry = self.pending[fd]
        limit = P.MAX_AUTH_FRAME_BYTES
        try:
            data = entry[0].recv(limit + 1 - len(entry[3]))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(poller, fd)
            return
        buf = entry[3] = entry[3] + data
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > limit:
                self._drop(poller, fd, None, P.FRAME_TOO_LARGE, f"frame of {len(buf)}+ bytes "
                           f"exceeds the limit of {limit} bytes before authentication; closing")
            return
        try:
            message = P.decode(buf[: end + 1], limit)
        except P.FrameError as exc:
            self._drop(poller, fd, exc.id, exc.code, exc.message + "; expected auth {token, "
                       "protocol}")
            return
        req_id = message.get("id")
        params = message.get("params") or {}
        token = params.get("token")
        version = params.get("protocol", 1)
        server = self.server
        if message.get("method") != "auth":
            self._drop(poller, fd, req_id, P.AUTH_REQUIRED,
                       "the first request must be auth {token, protocol}")
        elif not isinstance(token, str) or not _compare_digest(
                token.encode("utf-8", "surrogatepass"), server.token.encode()):
            self._drop(poller, fd, req_id, P.AUTH_FAILED,
                       "authentication failed: wrong or missing token")
        elif version != P.PROTOCOL_VERSION:
            self._drop(poller, fd, req_id, P.PROTOCOL_MISMATCH, f"protocol = {version!r} is not "
                       f"supported; this server speaks {P.PROTOCOL_VERSION}")
        else:
            del self.pending[fd]
            poller.unregister(fd)
            sock = entry[0]
            try:
                sock.setblocking(True)
                conn = Connection(server, sock, entry[1], buf[end + 1:])
                if req_id is not None:
                    sock.sendall(P.encode(P.response(req_id, server.info())))
                _thread.start_new_thread(conn.run, ())
            except (OSError, RuntimeError) as exc:  # the client left; no thread to be had
                log(f"connection {entry[1]}: {type(exc).__name__}: {exc}")
                sock.close()

    def _drop(self, poller: Any, fd: int, req_id: Any = None, code: int = 0,
              message: str = "") -> None:
        """Close, answering ``code`` first if given."""
        sock = self.pending.pop(fd)[0]
        poller.unregister(fd)
        if code:
            try:
                sock.send(P.encode(P.error_response(req_id, code, message)))
                sock.shutdown(_socket.SHUT_WR)
            except OSError:
                pass
        sock.close()
