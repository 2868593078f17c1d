"""Connections before authentication: one thread, poll(), and a bound on everything they hold.

Until a connection has sent ``auth {token, protocol}`` it costs no thread of its own: the gate
reads every pending connection with ``poll()`` on one thread and

- keeps at most :data:`~.wire.MAX_AUTH_FRAME_BYTES` of each (past that: an error, then closed),
- gives the whole handshake one deadline (``--handshake-timeout``), however slowly bytes drip in,
- holds at most :data:`MAX_PENDING` of them: a new connection past that evicts the oldest, so no
  number of idle connections keeps a real client out or grows memory past
  ``MAX_PENDING * MAX_AUTH_FRAME_BYTES`` (4 MB).

The token is compared in constant time. An authenticated connection gets its own thread
(:class:`.connection.Connection`), with any bytes it sent after the auth frame.
"""

from __future__ import annotations

import _socket
import _thread
import os
import time
from _operator import _compare_digest as compare_digest  # what hmac.compare_digest uses

from . import wire as P
from .connection import Connection
from .log import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .lifecycle import Server

#: Unauthenticated connections held at once (at most a quarter of the open-file limit); a new
#: one past this evicts the oldest. A client is read before anyone is evicted, so a flood must
#: open this many connections while one client's auth frame is on its way to push it out.
MAX_PENDING = 1024
#: How long and how much a refused connection may still send (discarded) before it is closed:
#: closing with unread bytes resets the connection, and the client could lose our error.
LINGER_S = 1.0
LINGER_BYTES = 1024 * 1024


class Pending:
    """One connection that has not authenticated yet."""

    __slots__ = ("buf", "closing", "deadline", "drained", "number", "sock")

    def __init__(self, sock: Any, number: int, deadline: float) -> None:
        self.sock = sock
        self.number = number
        self.deadline = deadline
        self.buf = bytearray()
        self.closing = False  # refused: answered, half-closed, draining until EOF or deadline
        self.drained = 0


class Gate:
    """The handshake of every new connection, on one thread started with the first one."""

    def __init__(self, server: Server, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.limit = P.MAX_AUTH_FRAME_BYTES
        self.lock = _thread.allocate_lock()
        self.incoming: list[Pending] = []  # accepted, not yet polled (guarded by lock)
        # by fd, oldest (nearest deadline) first; the gate thread's own
        self.pending: dict[int, Pending] = {}
        self.closing: dict[int, Pending] = {}  # refused, answered, draining
        self.cap = MAX_PENDING
        self.wake_r = self.wake_w = -1
        self.started = False

    def admit(self, sock: Any, number: int) -> None:
        """Hand over a just-accepted connection (called by the accept loop)."""
        sock.setblocking(False)
        entry = Pending(sock, number, time.monotonic() + self.timeout)
        with self.lock:
            self.incoming.append(entry)
            evicted = self.incoming.pop(0) if len(self.incoming) > self.cap else None
        if evicted is not None:
            _close(evicted.sock)
        if not self.started and not self._start():
            return
        try:
            os.write(self.wake_w, b"x")
        except OSError:  # the pipe is full: the gate is awake anyway
            pass

    def _start(self) -> bool:
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                self.cap = max(16, min(MAX_PENDING, soft // 4))
            if self.wake_r < 0:
                self.wake_r, self.wake_w = os.pipe()
                os.set_blocking(self.wake_r, False)
                os.set_blocking(self.wake_w, False)
            _thread.start_new_thread(self._run, ())
        except (OSError, RuntimeError) as exc:  # retried with the next connection
            log(f"cannot start the handshake thread: {exc}")
            return False
        self.started = True
        return True

    # -- the gate's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        import select

        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        while True:
            try:
                self._step(poller)
            except Exception as exc:  # the gate must outlive any one connection
                log(f"handshake: {type(exc).__name__}: {exc}")

    def _step(self, poller: Any) -> None:
        import select

        with self.lock:
            incoming, self.incoming = self.incoming, []
        for entry in incoming:
            fd = entry.sock.fileno()
            self.pending[fd] = entry
            poller.register(fd, select.POLLIN)
        if len(self.pending) + len(self.closing) > self.cap:
            # read what has already arrived first (a real client sends auth at once), then
            # evict refused connections and the oldest pending ones
            self._read_ready(poller, 0)
            while self.closing and len(self.pending) + len(self.closing) > self.cap:
                self._drop(poller, next(iter(self.closing)))
            while len(self.pending) > self.cap:
                self._drop(poller, next(iter(self.pending)))
        now = time.monotonic()
        while self.closing:  # each dict is in deadline order: only its head can be due
            fd, entry = next(iter(self.closing.items()))
            if entry.deadline > now:
                break
            self._drop(poller, fd)
        while self.pending:
            fd, entry = next(iter(self.pending.items()))
            if entry.deadline > now:
                break
            self._refuse(entry, now, None, P.TIMEOUT,
                         f"the handshake did not finish within {self.timeout:g} s; "
                         "expected auth {token, protocol}")
        deadlines = [d[next(iter(d))].deadline for d in (self.pending, self.closing) if d]
        wait_ms = max(0, int((min(deadlines) - now) * 1000) + 1) if deadlines else None
        self._read_ready(poller, wait_ms)

    def _read_ready(self, poller: Any, wait_ms: int | None) -> None:
        for fd, _events in poller.poll(wait_ms):
            if fd == self.wake_r:
                try:
                    os.read(self.wake_r, 4096)
                except OSError:
                    pass
            elif fd in self.pending or fd in self.closing:
                self._read(poller, fd)

    def _read(self, poller: Any, fd: int) -> None:
        entry = self.pending.get(fd) or self.closing[fd]
        want = 65536 if entry.closing else self.limit + 1 - len(entry.buf)
        try:
            data = entry.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(poller, fd)
            return
        if entry.closing:  # a refused client's leftovers, discarded
            entry.drained += len(data)
            if entry.drained > LINGER_BYTES:
                self._drop(poller, fd)
            return
        buf = entry.buf
        buf += data
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > self.limit:
                self._refuse(entry, time.monotonic(), None, P.FRAME_TOO_LARGE,
                             f"an auth frame of {len(buf)}+ bytes exceeds the limit of "
                             f"{self.limit} bytes before authentication; closing")
            return
        if self._authenticate(entry, bytes(buf[: end + 1]), bytes(buf[end + 1:])):
            del self.pending[fd]
            poller.unregister(fd)

    def _authenticate(self, entry: Pending, frame: bytes, rest: bytes) -> bool:
        """Check the auth frame: True once handed to a connection thread (or given up), False
        when refused (the entry stays, draining until closed)."""
        server = self.server
        try:
            message = P.decode(frame, self.limit)
        except P.FrameError as exc:
            self._refuse(entry, time.monotonic(), exc.id, exc.code,
                         f"{exc.message}; expected auth {{token, protocol}}")
            return False
        req_id = message.get("id")
        refusal = _check_auth(message, message.get("params") or {}, server.token)
        if refusal is not None:
            self._refuse(entry, time.monotonic(), req_id, *refusal)
            return False
        sock = entry.sock
        try:
            sock.setblocking(True)
            conn = Connection(server, sock, entry.number, rest)
            if req_id is not None:
                sock.sendall(P.encode(P.response(req_id, server.info()), server.max_frame))
            _thread.start_new_thread(conn.run, ())
        except (OSError, RuntimeError) as exc:  # the client went away; no thread to be had
            log(f"connection {entry.number}: {type(exc).__name__}: {exc}")
            _close(sock)
        return True

    def _refuse(self, entry: Pending, now: float, req_id: Any, code: int, message: str) -> None:
        """Answer with an error, half-close, and discard what still comes for a short while
        (closing with unread bytes would reset the connection and lose the answer)."""
        sock = entry.sock
        try:
            sock.send(P.encode(P.error_response(req_id, code, message)))
            sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass
        entry.closing = True
        entry.buf = bytearray()
        entry.deadline = now + LINGER_S
        fd = sock.fileno()
        self.pending.pop(fd, None)
        self.closing[fd] = entry

    def _drop(self, poller: Any, fd: int) -> None:
        entry = self.pending.pop(fd, None) or self.closing.pop(fd)
        try:
            poller.unregister(fd)
        except (KeyError, ValueError):
            pass
        _close(entry.sock)


def _check_auth(message: dict[str, Any], params: dict[str, Any],
                token: str) -> tuple[int, str] | None:
    """None if ``message`` is a valid auth request for ``token``; else (code, message)."""
    if message.get("method") != "auth":
        return P.AUTH_REQUIRED, "the first request must be auth {token, protocol}"
    given = params.get("token")
    if not isinstance(given, str) or not compare_digest(
        given.encode("utf-8", "surrogatepass"), token.encode()
    ):
        return P.AUTH_FAILED, "authentication failed: wrong or missing token"
    version = params.get("protocol", P.PROTOCOL_VERSION)
    if version != P.PROTOCOL_VERSION:
        return P.PROTOCOL_MISMATCH, (
            f"protocol = {version!r} is not supported; this server speaks {P.PROTOCOL_VERSION}")
    return None


def _close(sock: Any) -> None:
    try:
        sock.close()
    except OSError:
        pass
