"""``python``: run code in the persistent namespace, one request at a time.

A timeout or cancel interrupts the code with SIGINT (the namespace is kept); code that does not
stop within the grace period gets its worker killed, and the namespace is reset.
"""

from __future__ import annotations

import os
import time

from . import wire as P
from .params import param, timeout_param
from .pyprocess import PythonWorker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .jobs import Job

#: Default time between SIGINT and SIGKILL when python code overruns or is cancelled.
INTERRUPT_GRACE_S = 2.0


def run_python(job: Job, params: dict[str, Any], prepare: bool) -> Any:
    """The ``python`` job runner (see :mod:`.jobs`)."""
    if prepare:
        code = param(params, "code", str, required=True)
        grace = param(params, "interrupt_grace_s", (int, float), default=INTERRUPT_GRACE_S)
        return code, timeout_param(params), grace
    code, timeout, grace = job.prepared
    import _queue

    server, conn, req_id = job.conn.server, job.conn, job.req_id
    mailbox = _queue.SimpleQueue()
    job.on_cancel = lambda: mailbox.put(("cancel", None))
    with server.python_lock:  # one namespace, one request at a time
        if job.cancelled:
            conn.fail(req_id, P.CANCELLED, "python request cancelled before it started")
            return None
        worker = server.python
        if worker is None or worker.dead:
            worker = server.python = PythonWorker(server)
        worker.current = (conn, req_id)
        worker.mailbox = mailbox
        try:
            _python_call(worker, job, mailbox, code, timeout, grace)
        finally:
            worker.current = None
            worker.mailbox = None
    return None


def _python_call(worker: PythonWorker, job: Job, mailbox: Any, code: str,
                 timeout: float | None, grace: float) -> None:
    import _queue

    conn, req_id, server = job.conn, job.req_id, job.conn.server
    room = server.max_frame - 1024 - len(P._dumps(req_id))  # the worker cuts its reply to it
    try:
        os.write(worker.to_worker, P.encode({"id": 1, "code": code, "room": room},
                                            server.max_frame))
    except OSError:
        mailbox.put(("died", None))
    now = time.monotonic()
    deadline = now + timeout if timeout is not None else None
    interrupted_at = None
    timed_out = cancelled = reset = False
    reply = None
    if job.cancelled:
        mailbox.put(("cancel", None))
    while True:
        if interrupted_at is not None:
            wait: float | None = interrupted_at + grace - time.monotonic()
        elif deadline is not None:
            wait = deadline - time.monotonic()
        else:
            wait = None
        try:
            kind, value = mailbox.get(timeout=max(wait, 0.0)) if wait is not None else (
                mailbox.get())
        except _queue.Empty:
            if interrupted_at is None:
                timed_out = True
                interrupted_at = time.monotonic()
                worker.interrupt()
                continue
            reset = True
            worker.kill()
            break
        if kind == "result":
            reply = value
            break
        if kind == "died":
            reset = True
            break
        if kind == "cancel" and interrupted_at is None:
            cancelled = True
            interrupted_at = time.monotonic()
            worker.interrupt()
    if reset:
        server.python = None
        if not worker.dead:
            worker.kill()
    detail = {"namespace_reset": reset, "timed_out": timed_out, "cancelled": cancelled}
    how = (f"it did not stop within {grace:g}s of SIGINT, so the worker was killed and the "
           "namespace reset") if reset else "interrupted with SIGINT (namespace kept)"
    if timed_out:
        detail["error"] = reply and reply.get("error")
        conn.fail(req_id, P.TIMEOUT, f"python code exceeded its timeout of {timeout:g}s; {how}",
                  detail)
    elif cancelled:
        conn.fail(req_id, P.CANCELLED, f"python request cancelled; {how}", detail)
    elif reset:
        conn.fail(req_id, P.NAMESPACE_RESET,
                  "the python worker exited unexpectedly; the namespace was reset", detail)
    else:
        conn.reply(req_id, {"value": reply.get("value"), "error": reply.get("error")})
