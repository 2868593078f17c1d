"""The run journal: one JSON line per rollout row, flushed and fsynced as soon as the row exists,
so a crashed kernel loses nothing; and reading a journal back (a torn last line is skipped)."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["Journal", "encode_row", "read_journal"]


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
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break  # torn final write
            raise ValueError(f"{path}:{number}: not a journal row (invalid JSON)") from None
    return rows
