"""The Python worker process as the server sees it: start, pump its output, interrupt, kill.

The child runs :mod:`.pyworker`. It is started as ``python -u -c BOOT`` with the interpreter
running the server (site-packages enabled, so user code sees the image's packages), in its own
process group; the bootstrap reads the worker's path and source from the control pipe and runs
it (see :mod:`.pyworker` for why it is not imported).
"""

from __future__ import annotations

import _thread
import os
import sys

from . import wire as P
from .jobs import GROUPS_LOCK, forget_group, signal_group

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection
    from .lifecycle import Server

#: Where the worker's source lives: a file, or a member of the zipapp (``X.pyz/sandboxnb/...``).
WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyworker.py")

#: The child's ``-c`` program. argv: control-in fd, control-out fd, the worker's path (which
#: also names the process in ``ps``).
BOOT = (
    "import json, os, sys\n"
    "ctl = os.fdopen(int(sys.argv[1]), 'rb')\n"
    "worker = json.loads(ctl.readline())\n"
    "module = {'__name__': 'sandboxnb.server.pyworker', '__file__': worker['path']}\n"
    "exec(compile(worker['source'], worker['path'], 'exec'), module)\n"
    "module['main'](ctl, int(sys.argv[2]), worker['source'])\n"
)


def worker_source() -> str:
    """The text of :mod:`.pyworker`, read through the loader that loaded this package."""
    return __loader__.get_data(WORKER_PATH).decode("utf-8")  # a zipimporter or a file loader


class PythonWorker:
    """A child interpreter holding the persistent namespace; output and results via pipes."""

    def __init__(self, server: Server) -> None:
        import subprocess

        self.server = server
        boot = P.encode({"path": WORKER_PATH, "source": worker_source()}, server.max_frame)
        to_worker_r, self.to_worker = os.pipe()
        self.from_worker, from_worker_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-c", BOOT, str(to_worker_r), str(from_worker_w),
                 WORKER_PATH],
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                pass_fds=(to_worker_r, from_worker_w), start_new_session=True,
                cwd=server.workdir, env=server.child_env,
            )
        finally:
            for fd in (to_worker_r, from_worker_w, out_w, err_w):
                os.close(fd)
        with GROUPS_LOCK:
            server.process_groups.add(self.proc.pid)
        self.current: tuple[Connection, Any] | None = None
        self.mailbox: Any = None
        self.dead = False
        self.streams = {out_r: "stdout", err_r: "stderr"}
        try:
            os.write(self.to_worker, boot)  # a few KB: fits the pipe, never blocks
        except OSError:
            pass  # the worker died at once: the pump reports it
        _thread.start_new_thread(self._pump, ())

    def _pump(self) -> None:
        """Forward output to the current request, results to its mailbox, death to both."""
        import codecs
        import select

        for fd in self.streams:
            os.set_blocking(fd, False)
        decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in self.streams}
        poller = select.poll()
        for fd in (*self.streams, self.from_worker):
            poller.register(fd, select.POLLIN)
        results = bytearray()
        alive = True
        while alive:
            events = poller.poll()
            ready = {fd for fd, _ in events}
            for fd in self.streams:
                if fd in ready:
                    self._drain(fd, decoders[fd])
            if self.from_worker in ready:
                data = os.read(self.from_worker, 1 << 16)
                if not data:
                    alive = False
                    break
                results += data
                while True:
                    i = results.find(b"\n")
                    if i < 0:
                        break
                    line = bytes(results[: i + 1])
                    del results[: i + 1]
                    for fd in self.streams:  # output written before the result goes first
                        self._drain(fd, decoders[fd])
                    self._deliver(("result", P._loads(line)))
        for fd in self.streams:
            self._drain(fd, decoders[fd])
            os.close(fd)
        os.close(self.from_worker)
        try:
            os.close(self.to_worker)
        except OSError:
            pass
        self.dead = True
        forget_group(self.server, self.proc.pid)  # before reaping: its pid may be reused then
        code = self.proc.wait()
        self._deliver(("died", code))

    def _drain(self, fd: int, decoder: Any) -> None:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            current = self.current
            if current is not None:
                current[0].output(current[1], self.streams[fd], decoder.decode(data))

    def _deliver(self, item: tuple[str, Any]) -> None:
        mailbox = self.mailbox
        if mailbox is not None:
            mailbox.put(item)

    def interrupt(self) -> None:
        import _signal

        signal_group(self.server, self.proc.pid, _signal.SIGINT, group=False)

    def kill(self) -> None:
        import _signal

        signal_group(self.server, self.proc.pid, _signal.SIGKILL)
