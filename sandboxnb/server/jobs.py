"""Requests that run on their own thread (``exec``, ``python``) and can be cancelled.

A job runner is called twice: ``run(job, params, prepare=True)`` on the connection's reader thread
validates the parameters (a bad one is answered at once) and returns what the second call needs
as ``job.prepared``; ``run(job, params, prepare=False)`` then does the work on the job's thread.
"""

from __future__ import annotations

import _thread
import os

from . import wire as P
from .log import log
from .params import ParamError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection


#: Guards ``Server.process_groups``. A group is forgotten under it after its leader has exited
#: but BEFORE the leader is reaped (its pid cannot be handed out again while it is a zombie), and
#: groups are signalled under it only while still known: a recycled pid is never signalled.
GROUPS_LOCK = _thread.allocate_lock()


def exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited (it is NOT reaped: its pid stays ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def forget_group(server: Any, pid: int) -> None:
    """Wait until our child ``pid`` (a group leader) has exited, then forget its group; the
    caller reaps it afterwards."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass
    with GROUPS_LOCK:
        server.process_groups.discard(pid)


def signal_group(server: Any, pgid: int, sig: int, *, group: bool = True) -> None:
    """Send ``sig`` to a process group we started (or only its leader), if still ours."""
    with GROUPS_LOCK:
        if pgid not in server.process_groups:
            return
        try:
            if group:
                os.killpg(pgid, sig)
            else:
                os.kill(pgid, sig)
        except OSError:
            pass


class Job:
    """A running request, known to its connection by id until it finishes."""

    def __init__(self, conn: Connection, req_id: Any) -> None:
        self.conn = conn
        self.req_id = req_id
        self.cancelled = False
        self.prepared: Any = None
        #: set by the runner once there is something to stop (a process group, a worker call)
        self.on_cancel: Any = None

    def cancel(self) -> None:
        self.cancelled = True
        callback = self.on_cancel
        if callback is not None:
            callback()

    def run(self, run: Any, params: dict[str, Any]) -> None:
        try:
            run(self, params, prepare=False)
        except ParamError as exc:
            self.conn.fail(self.req_id, P.INVALID_PARAMS, str(exc))
        except Exception as exc:
            log(f"{type(exc).__name__} in request {self.req_id!r}: {exc}")
            self.conn.fail(self.req_id, P.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.conn.jobs.pop(self.req_id, None)


def start_job(conn: Connection, req_id: Any, params: dict[str, Any], run: Any) -> None:
    """Validate ``params`` with ``run`` here (the reader thread), then run it on a new thread."""
    job = Job(conn, req_id)
    job.prepared = run(job, params, prepare=True)
    if req_id is not None:
        if req_id in conn.jobs:
            raise ParamError(f"request id {req_id!r} is already running")
        conn.jobs[req_id] = job
    _thread.start_new_thread(job.run, (run, params))
