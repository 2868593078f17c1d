"""One authenticated client connection: framed reads on its own thread, locked writes from any.

Connections reach this module only once :mod:`.gate` has checked their ``auth`` frame; every
request is then dispatched to the server's method table (:mod:`.handlers`).
"""

from __future__ import annotations

import _socket
import _thread

from . import wire as P
from .log import log
from .params import ParamError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .jobs import Job
    from .lifecycle import Server

#: The shortest silence (no request, no heartbeat) after which a client counts as gone: 15 of
#: the clients' 3 s heartbeats. The silence limit is ``max(idle_timeout, SILENT_CLIENT_S)``, and
#: none when the idle rule is off; a client whose event loop is blocked this long (a notebook
#: cell that never yields) is dropped, and the idle window then starts.
SILENT_CLIENT_S = 45.0


class LineReader:
    """Buffered newline-framed reader over a raw socket with a frame size limit."""

    def __init__(self, sock: Any, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.buf = bytearray()
        self.scanned = 0

    def readline(self) -> bytes:
        """One frame including its newline; b"" at EOF; FrameError if over the limit."""
        buf = self.buf
        while True:
            i = buf.find(b"\n", self.scanned)
            if i >= 0:
                if i + 1 > self.limit:
                    raise P.FrameError(P.FRAME_TOO_LARGE, self._too_large(i + 1))
                line = bytes(buf[: i + 1])
                del buf[: i + 1]
                self.scanned = 0
                return line
            self.scanned = len(buf)
            if len(buf) > self.limit:
                raise P.FrameError(P.FRAME_TOO_LARGE, self._too_large(len(buf)))
            data = self.sock.recv(1 << 18)
            if not data:
                return b""
            buf += data

    def _too_large(self, size: int) -> str:
        return f"frame of {size}+ bytes exceeds the limit of {self.limit} bytes; closing"


class Connection:
    """One authenticated client: replies, notifications, and the requests it has running."""

    def __init__(self, server: Server, sock: Any, number: int, buffered: bytes = b"") -> None:
        self.server = server
        self.sock = sock
        self.number = number
        self.reader = LineReader(sock, server.max_frame)
        self.reader.buf += buffered  # what the client sent right after its auth frame
        self.send_lock = _thread.allocate_lock()
        self.jobs: dict[Any, Job] = {}
        self.closed = False

    def send(self, message: dict[str, Any]) -> bool:
        try:
            data = P.encode(message, self.server.max_frame)
        except P.FrameError as exc:
            data = P.encode(P.error_response(message.get("id"), exc.code, exc.message))
        with self.send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def send_raw(self, data: bytes) -> None:
        with self.send_lock:
            if not self.closed:
                try:
                    self.sock.sendall(data)
                except OSError:
                    pass

    def reply(self, req_id: Any, result: Any) -> None:
        if req_id is not None:
            self.send(P.response(req_id, result))

    def fail(self, req_id: Any, code: int, message: str, data: Any = None) -> None:
        self.send(P.error_response(req_id, code, message, data))

    def output(self, req_id: Any, stream: str, data: str) -> None:
        if data:
            self.send(P.notification("output", {"id": req_id, "stream": stream, "data": data}))

    def close(self) -> None:
        with self.send_lock:
            self.closed = True
        try:
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        """The connection's thread: requests until EOF or silence."""
        self.server.client_joined()
        try:
            idle = self.server.idle_timeout
            # a client that sends nothing, not even heartbeats, this long is gone; never less
            # than SILENT_CLIENT_S, so a busy client (heartbeats every few seconds) is never
            # dropped by a short idle_timeout, which is about no client being connected
            self._blocking_with_read_timeout(None if idle is None else max(idle, SILENT_CLIENT_S))
            self._serve()
        except Exception as exc:  # never let one connection take the server down
            log(f"connection {self.number}: {type(exc).__name__}: {exc}")
        finally:
            for job in list(self.jobs.values()):
                job.cancel()
            self.close()
            self.server.client_left()

    def _blocking_with_read_timeout(self, seconds: float | None) -> None:
        """Blocking mode (no poll() before each recv/send) with a kernel-side read timeout.

        A silent client (no heartbeats for ``seconds``) is treated as gone.
        """
        self.sock.settimeout(None)
        if seconds:
            import struct

            whole = int(seconds)
            timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
            try:
                self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, timeval)
            except OSError:
                self.sock.settimeout(seconds)

    def _read_message(self) -> dict[str, Any] | None:
        """Next message; None at EOF/timeout/oversize (after answering). FrameError if malformed."""
        try:
            line = self.reader.readline()
        except P.FrameError as exc:
            self.fail(None, exc.code, exc.message)
            return None
        except OSError:  # timeout or reset
            return None
        if not line:
            return None
        return P.decode(line, self.server.max_frame)

    def _serve(self) -> None:
        handlers = self.server.handlers
        while True:
            try:
                message = self._read_message()
            except P.FrameError as exc:
                self.fail(exc.id, exc.code, exc.message)
                continue
            if message is None:
                return
            method = message.get("method")
            if method is None:
                continue  # a stray response: nothing to do
            req_id = message.get("id")
            handler = handlers.get(method)
            if handler is None:
                self.fail(
                    req_id, P.METHOD_NOT_FOUND,
                    f"method {method!r} not found; accepted: {', '.join(P.METHODS)}",
                )
                continue
            try:
                handler(self, req_id, message.get("params") or {})
            except ParamError as exc:
                self.fail(req_id, P.INVALID_PARAMS, str(exc))
            except Exception as exc:
                self.fail(req_id, P.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
