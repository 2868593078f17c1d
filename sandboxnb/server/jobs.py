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


#: Pidfds of processes left running in a group whose leader was reaped (``cmd &`` in an exec):
#: killed at exit through their pidfds, which can never name another process.
LINGERING: dict[int, int] = {}


def forget_group(server: Any, pid: int) -> None:
    """Wait until our child ``pid`` (a group leader) has exited, keep pidfds of the members
    still in its group, then forget the group; the caller reaps the leader afterwards."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass
    members = _members(pid)  # the zombie leader pins the group id while we look
    with GROUPS_LOCK:
        server.process_groups.discard(pid)
        for member, fd in members.items():
            old = LINGERING.pop(member, None)
            if old is not None:
                os.close(old)
            LINGERING[member] = fd
        for member, fd in list(LINGERING.items()):  # drop the ones that have ended
            if _pidfd_exited(fd):
                os.close(LINGERING.pop(member))


def _members(pgid: int) -> dict[int, int]:
    """Pidfds of the live processes in group ``pgid`` other than its leader."""
    found: dict[int, int] = {}
    if not hasattr(os, "pidfd_open"):
        return found
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != pgid]
    except OSError:
        return found
    for pid in pids:
        if _pgid_of(pid) != pgid:
            continue
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        if _pgid_of(pid) == pgid and not _pidfd_exited(fd):  # the pidfd is that member
            found[pid] = fd
        else:
            os.close(fd)
    return found


def _pgid_of(pid: int) -> int:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return -1
    try:
        stat = os.read(fd, 512)
    except OSError:
        return -1
    finally:
        os.close(fd)
    try:
        return int(stat[stat.rindex(b")") + 2:].split(b" ", 3)[2])
    except ValueError:
        return -1


def _pidfd_exited(fd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def kill_lingering() -> None:
    """SIGKILL the processes kept by :func:`forget_group` (through their pidfds)."""
    import _signal

    for member in list(LINGERING):
        fd = LINGERING.pop(member)
        try:
            _signal.pidfd_send_signal(fd, _signal.SIGKILL)
        except (AttributeError, OSError):
            pass
        os.close(fd)


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
