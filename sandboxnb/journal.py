"""The run journal: one JSON line per rollout row, flushed and fsynced as soon as the row exists,
so a crashed kernel loses nothing; and reading a journal back (a torn last line is skipped).

The first line is a header saying what the run was (``{"sandboxnb_journal": 1, "taskset": ...,
"fingerprint": ..., "agent": ..., "runtime": ..., "config": ..., "repeats": ...}``, see
:mod:`sandboxnb.plan`); a run resumed with ``resume="force"`` appends its own header, and the
newest one describes the rows after it. Journals written before headers existed hold rows only
and still load. Every line is checked when read: a line that is neither a header nor a row with
fields of the right types is a :class:`ConfigError` naming the file, the line and the field.

One writer at a time: an open :class:`Journal` holds an exclusive ``flock`` on its file (released
when it closes, or when its process dies, even by ``kill -9``), and planning a resume reads the
journal under a shared one, so a second run of the same journal, in this process or another, is
refused at once naming the process writing it. A torn tail is found and cut on bytes (at the
last newline), whatever the fragment holds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from sandboxnb.errors import ConfigError

__all__ = [
    "HEADER_KEY",
    "STATUSES",
    "UNCHECKED",
    "Journal",
    "Stamp",
    "encode_row",
    "read_entries",
    "read_journal",
    "repair_torn_tail",
    "snapshot",
]

#: the key that marks a header line; its value is the journal format version
HEADER_KEY = "sandboxnb_journal"
JOURNAL_FORMAT = 1
#: the status of a rollout's row
STATUSES = ("ok", "error", "timeout", "cancelled")

log = logging.getLogger("sandboxnb.journal")
#: what a journal file was when read: (device, inode, size, mtime ns); None for a missing or
#: empty file
Stamp = tuple[int, int, int, int] | None
#: ``Journal(expect=UNCHECKED)``: open whatever the file holds now
UNCHECKED = "unchecked"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def encode_row(row: dict[str, Any]) -> str:
    """One journal line for ``row`` (NaN becomes ``null``; anything else not JSON, a string)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    return json.dumps(clean, default=_json_default, allow_nan=False) + "\n"


class Journal:
    """Appends rows to a JSONL file, each flushed and fsynced before the next is written.

    Writes happen on one background thread so the event loop never waits on the disk. Opening
    creates the parent directory and the file (append mode), so a path that cannot be written
    fails here, before any rollout starts.
    """

    def __init__(self, path: str | Path, header: dict[str, Any] | None = None,
                 expect: Stamp | str = UNCHECKED) -> None:
        """``expect``: the :func:`snapshot` stamp the run was planned against; a journal written
        since (by another run) is refused rather than appended to."""
        self.path = Path(path)
        #: the file's stamp once closed (what a later run of the same journal expects)
        self.final_stamp: Stamp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError(f"journal = {str(self.path)!r} cannot be written ({err.strerror}); "
                              "expected a file path in a writable folder") from None
        try:
            _lock(fd, self.path, fcntl.LOCK_EX)
            if expect != UNCHECKED and _stamp(fd) != expect:
                raise ConfigError(
                    f"journal = {str(self.path)!r} was written since this run was planned (by "
                    "another run of it): plan the run again (resume it again) so it runs only "
                    "what the journal still lacks")
            _repair(fd, self.path)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandboxnb-journal")
        if header is not None:  # durable before the first row: a crash keeps what the run was
            self._write(encode_row({HEADER_KEY: JOURNAL_FORMAT, **header}))

    def _write(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, row: dict[str, Any]) -> None:
        """Queue ``row`` for a durable append (order is preserved)."""
        line = encode_row(row)
        try:
            self._writer.submit(self._write, line)
        except RuntimeError:  # interpreter shutting down: thread pools refuse work
            self._writer.shutdown(wait=True)  # keep the order: drain what was queued first
            self._write(line)

    def close(self) -> None:
        """Wait for every queued row to be on disk, then close the file."""
        self._writer.shutdown(wait=True)
        if not self._file.closed:
            self.final_stamp = _stamp(self._file.fileno())
            self._file.close()  # releases the lock

    def __repr__(self) -> str:
        return f"<Journal {str(self.path)!r}>"


def repair_torn_tail(path: Path) -> int:
    """Cut a torn last line (a crash mid-write: no newline at the end) so the next row starts
    on a line of its own; return how many bytes were cut. The torn row was never complete."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return _repair(fd, Path(path))
    finally:
        os.close(fd)


def _repair(fd: int, path: Path) -> int:
    """:func:`repair_torn_tail` on an open file: bytes after the last newline are cut."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return 0
    keep, start = 0, size
    while start > 0:  # back from the end, a MiB at a time, to the last newline
        start = max(0, start - (1 << 20))
        newline = os.pread(fd, size - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("journal %s: cut a torn last line of %d bytes (a crash mid-write)", path,
                size - keep)
    return size - keep


def _stamp(fd: int) -> Stamp:
    info = os.fstat(fd)
    return None if info.st_size == 0 else (info.st_dev, info.st_ino, info.st_size,
                                           info.st_mtime_ns)


def _lock(fd: int, path: Path, kind: int) -> None:
    """Take a ``flock`` of ``kind`` without waiting; held by a writer: a :class:`ConfigError`."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        pid = _writer_pid(fd)
        who = "" if pid is None else f" (pid {pid}{', this process' if pid == os.getpid() else ''})"
        raise ConfigError(
            f"journal = {str(path)!r} is being written by another run{who}: wait for it to end, "
            "or choose another journal path (CLI: --journal PATH)") from None


def _writer_pid(fd: int) -> int | None:
    """The process holding an exclusive flock on ``fd``'s file, from /proc/locks (Linux)."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()  # N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and \
                        fields[5].rsplit(":", 1)[-1] == str(inode):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def snapshot(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], Stamp]:
    """:func:`read_entries` of a journal no run is writing, and its :data:`Stamp` (what
    :class:`Journal` ``expect`` s). A journal being written is a :class:`ConfigError` naming
    the process writing it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, [], None
    except OSError as err:
        raise FileNotFoundError(f"journal {str(path)!r} cannot be read: {err.strerror}") from None
    try:
        _lock(fd, path, fcntl.LOCK_SH)  # no writer can start while we read
        stamp = _stamp(fd)
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read()
    finally:
        os.close(fd)  # releases the lock
    return (*_parse(data, path), stamp)


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """Read every row of a journal (headers left out); a torn last line is skipped."""
    return read_entries(path)[1]


def read_entries(path: str | Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The newest header of a journal (``None`` for a journal written before headers) and its
    rows. Raises :class:`ConfigError` naming the line of anything that is not a header or row."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"journal {str(path)!r} cannot be read: {err.strerror}") from None
    return _parse(data, path)


def _parse(data: bytes, path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    if data and not data.endswith(b"\n"):  # a torn final write: cut on bytes, at the last newline
        data = data[: data.rfind(b"\n") + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"journal {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                          f"{err.start}): not a sandboxnb journal") from None
    header: dict[str, Any] | None = None
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{number}: not a journal row (invalid JSON: "
                              f"{line[:80]!r})") from None
        if isinstance(entry, dict) and HEADER_KEY in entry:
            header = _checked(entry, _HEADER_FIELDS, f"{path}:{number}")
            continue
        if not isinstance(entry, dict) or not {"task_id", "repeat", "status"} <= entry.keys():
            raise ConfigError(f"{path}:{number}: not a journal row (expected an object with "
                              f"task_id, repeat and status; got {line[:80]!r})")
        rows.append(_checked(entry, _ROW_FIELDS, f"{path}:{number}"))
    return header, rows


# ---- what each field of a line may hold ---------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _iso_time(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def _nullable(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _text(value: Any) -> bool:
    return isinstance(value, str)


def _count(minimum: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and \
        value >= minimum


_Check = tuple[Callable[[Any], bool], str]
_NUMBER: _Check = (_nullable(_number), "a number or null")
_TEXT: _Check = (_nullable(_text), "a string or null")
_ROW_FIELDS: dict[str, _Check] = {
    "task_id": (_text, "a string"),
    "repeat": (_count(0), "an integer >= 0"),
    "status": (STATUSES.__contains__, f"one of {', '.join(STATUSES)}"),
    "run_id": _TEXT, "provider": _TEXT, "sandbox_id": _TEXT, "error": _TEXT, "image": _TEXT,
    "gpu": _TEXT, "answer": _TEXT,
    "reward": _NUMBER, "acquire_s": _NUMBER, "rollout_s": _NUMBER, "release_s": _NUMBER,
    "duration_s": _NUMBER, "cpu": _NUMBER,
    "memory_mb": (_nullable(_count(0)), "an integer or null"),
    "started_at": (_nullable(_iso_time), "an ISO 8601 time or null"),
    "info": (_nullable(lambda v: isinstance(v, dict)), "an object or null"),
}
_HEADER_FIELDS: dict[str, _Check] = {
    HEADER_KEY: (lambda v: v == JOURNAL_FORMAT and not isinstance(v, bool), str(JOURNAL_FORMAT)),
    "taskset": (_text, "a string"),
    "fingerprint": (_text, "a string"),
    "tasks": (_count(0), "an integer >= 0"),
    "agent": (_text, "a string"),
    "runtime": (_text, "a string"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "repeats": (_count(1), "an integer >= 1"),
    "sandboxnb_version": (_text, "a string"),
    "created_at": (_iso_time, "an ISO 8601 time"),
}


def _checked(entry: dict[str, Any], fields: dict[str, _Check], where: str) -> dict[str, Any]:
    """``entry`` if each known field present holds what it may (unknown fields are kept)."""
    for name, (valid, accepted) in fields.items():
        if name in entry and not valid(entry[name]):
            raise ConfigError(f"{where}: {name} = {entry[name]!r}: expected {accepted} "
                              "(not a sandboxnb journal line, or a damaged one)")
    return entry
