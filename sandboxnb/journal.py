"""The run journal: one JSON line per rollout row, flushed and fsynced as soon as the row exists,
so a crashed kernel loses nothing; and reading a journal back (a torn last line is skipped)."""

from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sandboxnb.errors import ConfigError

__all__ = ["Journal", "encode_row", "read_journal", "repair_torn_tail"]

log = logging.getLogger("sandboxnb.journal")


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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandboxnb-journal")

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
            self._file.close()

    def __repr__(self) -> str:
        return f"<Journal {str(self.path)!r}>"


def repair_torn_tail(path: Path) -> int:
    """Cut a torn last line (a crash mid-write: no newline at the end) so the next row starts
    on a line of its own; return how many bytes were cut. The torn row was never complete."""
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return 0
            start = max(0, size - (1 << 20))
            fh.seek(start)
            tail = fh.read()
            keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return 0
    log.warning("journal %s: cut a torn last line of %d bytes (a crash mid-write)", path,
                size - keep)
    return size - keep


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    """Read every row of a journal; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise FileNotFoundError(f"journal {str(path)!r} cannot be read: {err.strerror}") from None
    rows = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn final write
            raise ConfigError(f"{path}:{number}: not a journal row (invalid JSON: "
                              f"{line[:80]!r})") from None
        if not isinstance(row, dict) or not {"task_id", "repeat", "status"} <= row.keys():
            raise ConfigError(f"{path}:{number}: not a journal row (expected an object with "
                              f"task_id, repeat and status; got {line[:80]!r})")
        rows.append(row)
    return rows
