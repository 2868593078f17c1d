"""The Python worker: a child interpreter that holds one persistent namespace.

This module runs in the worker process, never in the server. The server does not make the child
import it (the image's ``sys.path`` may hold another sandboxnb, or none): it sends this file's path
and source down the control pipe, and the child's bootstrap (see :mod:`.pyprocess`) compiles it
under that path and calls :func:`main`. So tracebacks through the worker name this file and its
real line numbers, and the user's ``sys.modules`` gains no ``sandboxnb``. It therefore imports
nothing from its package: stdlib only, Python >= 3.9.

Control pipe, one JSON object per line: ``{"id", "code", "room"}`` in, ``{"id", "value",
"error"}`` out (each string cut to ``room`` bytes as JSON);
the code's stdout and stderr go to the worker's own fds 1 and 2, which the server streams.
SIGINT interrupts the running code (a ``KeyboardInterrupt`` reported as its error).
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import linecache
import os
import sys
import traceback

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO

#: File names of submitted code are ``<sandbox-1>``, ``<sandbox-2>``...
USER_PREFIX = "<sandbox-"


def main(ctl_in: BinaryIO, ctl_out_fd: int, source: str) -> None:
    """Serve requests from ``ctl_in`` until the server closes it."""
    linecache.cache[__file__] = (len(source), None, source.splitlines(True), __file__)
    ctl_out = os.fdopen(ctl_out_fd, "wb", buffering=0)
    sys.stdin = open(os.devnull)
    sys.stdout = _unbuffered_text(1)
    sys.stderr = _unbuffered_text(2)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    counter = 0
    while True:
        try:
            line = ctl_in.readline()
            if not line:
                break
            request = json.loads(line)
            counter += 1
            reply = {"id": request["id"], "value": None, "error": None}
            room = request.get("room")
            try:
                value = run(namespace, request["code"], f"{USER_PREFIX}{counter}>")
                reply["value"] = bounded(value, room, "the value")
            except BaseException as exc:
                reply["error"] = describe(exc, room)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            ctl_out.write((json.dumps(reply) + "\n").encode())
        except KeyboardInterrupt:
            continue  # an interrupt that arrived between requests


def _unbuffered_text(fd: int) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                            errors="backslashreplace", write_through=True)


def run(namespace: dict[str, Any], code: str, name: str) -> str | None:
    """Run ``code`` in ``namespace``; the repr of a final expression's value, like a REPL."""
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    tree = ast.parse(code, name, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, name, "exec"), namespace)
    if last is not None:
        value = eval(compile(last, name, "eval"), namespace)
        if value is not None:
            namespace["_"] = value
            return repr(value)
    return None


def bounded(text: str | None, room: int | None, what: str) -> str | None:
    """``text``, cut to at most ``room`` bytes as JSON, with a marker saying how much."""
    if text is None or room is None or len(json.dumps(text)) <= room:
        return text
    keep, room = len(text), room - 99  # the marker's room
    while keep and len(json.dumps(text[:keep])) > room:
        keep = min(keep - 1, keep * room // len(json.dumps(text[:keep])))
    return f"{text[:keep]}\n[... {len(text) - keep} more characters of {what} cut: frame limit]"


def describe(exc: BaseException, room: int | None = None) -> dict[str, str]:
    """The error as reported: type, message, and a traceback that starts at the user's code.

    An error raised outside the user's code (say, by ``repr`` of the result) keeps the worker's
    frames, so the report says where it happened; a SyntaxError in the submitted code needs none.
    """
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(USER_PREFIX):
        tb = tb.tb_next
    if tb is None and not isinstance(exc, SyntaxError):
        tb = exc.__traceback__
    part = room and room // 2 - 500
    return {
        "type": type(exc).__name__,
        "message": bounded(str(exc), part, "the message"),
        "traceback": bounded("".join(traceback.format_exception(type(exc), exc, tb)), part,
                             "the traceback"),
    }
