"""The method table: which function answers each wire method, and the small ones themselves.

The modules behind ``exec``, ``python`` and the file methods load on their first request, not
at startup: a session that never runs Python never loads the worker's code.
"""

from __future__ import annotations

from . import wire as P
from .jobs import start_job
from .log import log
from .params import param

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection


def handle_auth_again(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    conn.reply(req_id, conn.server.info())


def handle_ping(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    if req_id is not None:
        conn.send_raw(P._dumps({"jsonrpc": "2.0", "id": req_id, "result": {}}).encode() + b"\n")


def handle_shutdown(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    log("shutdown requested")
    conn.reply(req_id, {"ok": True})
    conn.server.exit(0)


def handle_cancel(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    job = conn.jobs.get(param(params, "id", (int, str), required=True))
    if job is not None:
        job.cancel()
    conn.reply(req_id, {"cancelled": job is not None})


def handle_exec(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    from .execjob import run_exec

    start_job(conn, req_id, params, run_exec)


def handle_python(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    from .pyjob import run_python

    start_job(conn, req_id, params, run_python)


def handle_write_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    from .files import write_file

    write_file(conn, req_id, params)


def handle_read_file(conn: Connection, req_id: Any, params: dict[str, Any]) -> None:
    from .files import read_file

    read_file(conn, req_id, params)


#: ``handler(conn, req_id, params)`` by method name; one per name in :data:`wire.METHODS`.
HANDLERS = {
    "auth": handle_auth_again,
    "ping": handle_ping,
    "exec": handle_exec,
    "python": handle_python,
    "cancel": handle_cancel,
    "write_file": handle_write_file,
    "read_file": handle_read_file,
    "shutdown": handle_shutdown,
}
