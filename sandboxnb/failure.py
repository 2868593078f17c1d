"""What a failed rollout's row says about its failure: a one-line cause and the traceback of the
user's code (agent, grader, setup), bounded; the engine's own frames are left out."""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path

__all__ = ["TRACEBACK_CHARS", "TRACEBACK_LINES", "clean_text", "one_line", "user_traceback"]

#: a row's traceback keeps at most this many of its last lines, and this many characters
TRACEBACK_LINES = 30
TRACEBACK_CHARS = 8 * 1024
#: how many chained exceptions (``raise ... from ...``) a row's traceback follows
_CHAIN_DEPTH = 20
#: a row's one-line cause is cut at this many characters
CAUSE_CHARS = 300

_PACKAGE = str(Path(__file__).resolve().parent)
_ASYNCIO = str(Path(asyncio.__file__).resolve().parent)
#: frames that never explain a failure: the event loop and the engine that calls user code
_ENGINE = (_ASYNCIO, *(str(Path(_PACKAGE, name)) for name in
                       ("rollout.py", "runner.py", "scheduler.py", "providers")))


def clean_text(text: str) -> str:
    """``text`` that any UTF-8 consumer takes: lone surrogates become ``\\udcff`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (bounded; a message that cannot be made says so)."""
    try:
        lines = str(err).strip().splitlines()
    except Exception:
        lines = ["<the exception's message could not be made>"]
    text = clean_text(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__)
    return text if len(text) <= CAUSE_CHARS else text[:CAUSE_CHARS] + "..."


def _path(frame: traceback.FrameSummary) -> str:
    return str(Path(frame.filename).resolve()) if frame.filename[:1] != "<" else frame.filename


def _trim(exc: traceback.TracebackException, depth: int) -> None:
    """Keep the frames of user code. The raising frame stays even when it is ours (it says what
    failed: ``raise_for_error``, a built-in grader); without user frames (a failed setup
    command) sandboxnb's frames stay, never the engine's or the event loop's."""
    frames = [f for f in exc.stack if not _path(f).startswith(_ENGINE)] or list(exc.stack)[-1:]
    users = [f for f in frames[:-1] if not _path(f).startswith(_PACKAGE)]
    kept = users + frames[-1:] if users else frames
    exc.stack = traceback.StackSummary.from_list(kept)
    if depth >= _CHAIN_DEPTH:  # a chain this long is cut (formatting it would recurse past
        exc.__cause__ = exc.__context__ = None  # Python's limit)
        return
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            _trim(linked, depth + 1)


def user_traceback(err: BaseException) -> str:
    """The traceback of ``err`` with the engine's frames left out, cut to its last
    :data:`TRACEBACK_LINES` lines and :data:`TRACEBACK_CHARS` characters."""
    try:
        exc = traceback.TracebackException.from_exception(err, limit=200)
        _trim(exc, depth=0)
        lines = clean_text("".join(exc.format())).rstrip("\n").splitlines()
    except Exception as failure:  # an exception that cannot be described is still a row
        return f"<the traceback could not be made: {type(failure).__name__}>"
    if len(lines) > TRACEBACK_LINES:
        lines = [f"[... {len(lines) - TRACEBACK_LINES} earlier lines cut]",
                 *lines[-TRACEBACK_LINES:]]
    text = "\n".join(lines)
    if len(text) > TRACEBACK_CHARS:
        text = f"[... {len(text) - TRACEBACK_CHARS} earlier characters cut]\n" + \
            text[-TRACEBACK_CHARS:]
    return text
