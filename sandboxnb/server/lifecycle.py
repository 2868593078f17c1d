"""The server object: shared state, the accept loop, the dead-man switch, and shutdown.

The server leaves by itself (exit code 0, every child process group killed) when no client has
connected within ``--startup-timeout``, when no client has been connected for ``--idle-timeout``,
or when its owner (``--owner-pid``, its parent) has died; also on ``shutdown`` or SIGTERM.
"""

from __future__ import annotations

import _socket
import _thread
import os
import sys
import time

from . import wire as P
from .gate import Gate
from .handlers import HANDLERS
from .log import log
from .options import TOKEN_ENV

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .pyprocess import PythonWorker


class Server:
    """State shared by every connection: token, limits, children, the dead-man switch."""

    def __init__(self, opts: dict[str, Any], token: str, listener: Any) -> None:
        self.opts = opts
        self.token = token
        self.listener = listener
        self.max_frame: int = opts["max_frame_bytes"] or P.MAX_FRAME_BYTES
        self.max_file: int = opts["max_file_bytes"] or P.MAX_FILE_BYTES
        self.idle_timeout: float | None = opts["idle_timeout"]
        #: our parent, the local owner (kernel or CLI); once we are re-parented, it has died
        self.owner_pid: int | None = opts.get("owner_pid")
        self.startup_timeout: float | None = opts["startup_timeout"]
        self.workdir = os.getcwd()
        self.child_env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        self.lock = _thread.allocate_lock()
        self.clients = 0
        self.connections = 0
        self.ever_connected = False
        self.last_change = time.monotonic()
        self.started = self.last_change
        #: every process group started (exec commands, the python worker): killed on exit
        self.process_groups: set[int] = set()
        self.python: PythonWorker | None = None  # created on first use
        self.python_lock = _thread.allocate_lock()
        self.exiting = False
        self.handlers = HANDLERS
        #: every new connection's handshake (bounded in bytes, time and count)
        self.gate = Gate(self, opts.get("handshake_timeout") or P.HANDSHAKE_TIMEOUT_S)

    def info(self) -> dict[str, Any]:
        """What ``auth`` answers: who this server is and its limits."""
        return {
            "server": "sandboxnb",
            "protocol": P.PROTOCOL_VERSION,
            "sandbox_id": self.opts["sandbox_id"],
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "workdir": self.workdir,
            "methods": list(P.METHODS),
            "max_frame_bytes": self.max_frame,
            "max_file_bytes": self.max_file,
        }

    def client_joined(self) -> None:
        with self.lock:
            self.clients += 1
            self.ever_connected = True

    def client_left(self) -> None:
        with self.lock:
            self.clients -= 1
            self.last_change = time.monotonic()

    def serve_forever(self) -> None:
        """Accept connections until shutdown or the dead-man switch fires."""
        while not self.exiting:
            if self.owner_pid is not None and os.getppid() != self.owner_pid:
                log(f"owner process {self.owner_pid} is gone: exiting (dead-man switch)")
                self.exit(0)
            with self.lock:
                clients, last = self.clients, self.last_change
                limit = self.idle_timeout if self.ever_connected else self.startup_timeout
                if not self.ever_connected:
                    last = self.started
            wait = 1.0
            if clients == 0 and limit is not None:
                remaining = last + limit - time.monotonic()
                if remaining <= 0:
                    why = "idle" if self.ever_connected else "no client connected"
                    log(f"{why} for {limit:g}s: exiting (dead-man switch)")
                    self.exit(0)
                wait = min(wait, max(remaining, 0.01))
            self.listener.settimeout(wait)
            try:
                fd, _addr = self.listener._accept()
            except OSError:  # timeout (socket.timeout subclasses OSError) or EINTR
                continue
            sock = _socket.socket(self.listener.family, _socket.SOCK_STREAM, 0, fd)
            self.connections += 1
            if sock.family != _socket.AF_UNIX:
                try:
                    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            self.gate.admit(sock, self.connections)

    def kill_children(self) -> None:
        """SIGKILL every process group this server started that is still ours (exec commands,
        the python worker), and the processes a finished command left in its group (held by
        pidfd): groups are forgotten as their leaders are reaped (see :data:`.jobs.GROUPS_LOCK`),
        so a recycled pid is never signalled."""
        import _signal

        from .jobs import GROUPS_LOCK, kill_lingering

        acquired = GROUPS_LOCK.acquire(True, 5.0)  # bounded: exit must not hang
        try:
            for pgid in list(self.process_groups):
                try:
                    os.killpg(pgid, _signal.SIGKILL)
                except OSError:
                    pass
            self.process_groups.clear()
            kill_lingering()  # what finished commands left in their groups
        finally:
            if acquired:
                GROUPS_LOCK.release()

    def exit(self, code: int = 0) -> None:
        """Kill children and leave the process at once."""
        self.exiting = True
        try:
            self.kill_children()
        finally:
            if self.opts.get("unix"):
                try:
                    os.unlink(self.opts["unix"])
                except OSError:
                    pass
            os._exit(code)
