"""The server object: shared state, the accept loop, the dead-man switch, and shutdown.

The dead-man switch: the server leaves by itself (exit code 0, every child process group
killed) when

* no client has connected within ``--startup-timeout`` of its start, or, when the idle rule is
  on, within ``max(idle, FIRST_CLIENT_S)`` if that is shorter (15 s by default: a live owner
  connects within a second or two of the server listening; an owner killed while acquiring
  never does);
* its last client has been gone for ``--idle-timeout`` (15 s by default: a few of the clients'
  3 s heartbeats). A client is gone when its connection closes, or when it has sent nothing,
  not even a heartbeat, for the silence limit (``max(idle, SILENT_CLIENT_S)``, see
  :mod:`.connection`); a new connection within the window keeps the server;
* its owner (``--owner-pid``, its parent) has died: checked every second; with
  ``--remove-dir`` it then also removes that directory (the sandbox's host directory).

It also leaves on ``shutdown`` or SIGTERM (the owner's release; ``--remove-dir`` is removed
then too, so an owner killed while releasing leaves no directory behind). ``--idle-timeout 0``
switches the idle rule off.
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

#: With the idle rule on, the server waits at most ``max(idle, FIRST_CLIENT_S)`` (and at most
#: ``--startup-timeout``) for its first client.
FIRST_CLIENT_S = 15.0


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
            if self.owner_gone():
                log(f"owner process {self.owner_pid} is gone: exiting (dead-man switch)")
                self.remove_host_dir()
                self.exit(0)
            remaining = self.idle_remaining()
            if remaining is not None and remaining <= 0:
                why = "idle" if self.ever_connected else "no client connected"
                log(f"{why} for {self.idle_limit():g}s: exiting (dead-man switch)")
                self.exit(0)
            # wake at least every second: the owner check is the local sandbox's 1 s window
            wait = 1.0 if remaining is None else min(1.0, max(remaining, 0.01))
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

    def owner_gone(self) -> bool:
        """Whether the owner process died (we were re-parented)."""
        return self.owner_pid is not None and os.getppid() != self.owner_pid

    def idle_remaining(self) -> float | None:
        """Seconds until the idle (or first-client) rule fires; None while a client is
        connected or when the rule is off."""
        with self.lock:
            if self.clients:
                return None
            last = self.last_change if self.ever_connected else self.started
        limit = self.idle_limit()
        return None if limit is None else last + limit - time.monotonic()

    def idle_limit(self) -> float | None:
        """How long the server may go without a client now (None: forever)."""
        idle, startup = self.idle_timeout, self.startup_timeout
        if self.ever_connected:
            return idle
        if idle is None or startup is None:
            return startup
        return min(startup, max(idle, FIRST_CLIENT_S))

    def remove_host_dir(self) -> None:
        """Remove ``--remove-dir`` (its owner, who would have removed it, is gone)."""
        path = self.opts.get("remove_dir")
        if not path:
            return
        self.kill_children()  # nothing writes into it any more
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    def terminate(self) -> None:
        """SIGTERM: the owner releases the sandbox. Leave, removing ``--remove-dir``."""
        self.remove_host_dir()
        self.exit(0)

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
