"""The Python worker: a child interpreter that holds one persistent namespace.

This module runs in the worker process, never in the server. The server does not make the child
import it (the image's ``sys.path`` may hold another sandboxnb, or none): it sends this file's path
and source down the control pipe, and the child's bootstrap (see :mod:`.pyprocess`) compiles it
under that path and calls :func:`main`. So tracebacks through the worker name this file and its
real line numbers, and the user's ``sys.modules`` gains no ``sandboxnb``. It therefore imports
nothing from its package: stdlib only, Python >= 3.9.

Control pipe, one JSON object per line: ``{"id", "code", "max_bytes"}`` in, ``{"id", "value",
"error"}`` out, each string of the reply cut to fit ``max_bytes`` as JSON (see :func:`bounded`);
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
            budget = request.get("max_bytes")
            try:
                value = run(namespace, request["code"], f"{USER_PREFIX}{counter}>")
                reply["value"] = bounded(value, budget, "the value")
            except BaseException as exc:
                reply["error"] = describe(exc, budget)
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


def bounded(text: str | None, max_bytes: int | None, what: str) -> str | None:
    """``text``, or its head and a marker saying how much was cut, so that it takes at most
    ``max_bytes`` as a JSON string (ASCII-escaped, the way the wire sends it)."""
    if text is None or max_bytes is None:
        return text
    size = len(json.dumps(text)) - 2
    if size <= max_bytes:
        return text
    keep = len(text)
    while True:
        marker = f"\n[... {len(text) - keep} more characters of {what} cut: over the frame limit]"
        room = max_bytes - len(json.dumps(marker)) + 2
        if size <= room or not keep:
            return text[:keep] + marker
        keep = max(0, min(keep - 1, keep * max(room, 0) // size))  # shrinks every round
        size = len(json.dumps(text[:keep])) - 2


def describe(exc: BaseException, max_bytes: int | None = None) -> dict[str, str]:
    """The error as reported: type, message, and a traceback that starts at the user's code;
    within ``max_bytes`` (as JSON) in all.

    An error raised outside the user's code (say, by ``repr`` of the result) keeps the worker's
    frames, so the report says where it happened; a SyntaxError in the submitted code needs none.
    """
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(USER_PREFIX):
        tb = tb.tb_next
    if tb is None and not isinstance(exc, SyntaxError):
        tb = exc.__traceback__
    part = None if max_bytes is None else max(0, (max_bytes - 1000) // 2)
    return {
        "type": bounded(type(exc).__name__, None if max_bytes is None else 500, "the type"),
        "message": bounded(str(exc), part, "the message"),
        "traceback": bounded("".join(traceback.format_exception(type(exc), exc, tb)), part,
                             "the traceback"),
    }
