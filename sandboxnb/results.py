"""Result rows: the crash-safe journal (JSONL, fsynced per row) and the tidy DataFrame."""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "Journal", "read_journal", "rows_to_frame", "write_rows"]

COLUMNS = [
    "run_id",
    "task_id",
    "repeat",
    "provider",
    "sandbox_id",
    "status",
    "reward",
    "error",
    "started_at",
    "acquire_s",
    "rollout_s",
    "release_s",
    "duration_s",
    "image",
    "cpu",
    "memory_mb",
    "gpu",
    "answer",
    "info",
]
_CATEGORICAL = ["provider", "status", "image", "gpu"]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _encode(row: dict[str, Any]) -> str:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    return json.dumps(clean, default=_json_default, allow_nan=False) + "\n"


class Journal:
    """Appends rows to a JSONL file, each flushed and fsynced before the next is written.

    Writes happen on one background thread so the event loop never waits on the disk.
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
        line = _encode(row)
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


def rows_to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One tidy row per rollout, with UTC datetimes, float rewards (NaN where not graded)
    and categoricals for the low-cardinality columns."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["repeat"] = frame["repeat"].astype("Int64")
    frame["memory_mb"] = frame["memory_mb"].astype("Int64")
    for col in ("reward", "acquire_s", "rollout_s", "release_s", "duration_s", "cpu"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
    frame["started_at"] = pd.to_datetime(frame["started_at"], utc=True, format="ISO8601")
    for col in _CATEGORICAL:
        frame[col] = frame[col].astype("category")
    frame["status"] = frame["status"].cat.set_categories(["ok", "error", "timeout", "cancelled"])
    return frame


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows to ``path`` in the format its extension names (.jsonl, .csv, .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".parquet"):
        raise ValueError(
            f"output = {str(path)!r}: unsupported extension {suffix or '(none)'!r}; "
            "accepted: .jsonl, .csv, .parquet"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        path.write_text("".join(_encode(row) for row in rows), encoding="utf-8")
        return path
    frame = rows_to_frame(rows)
    frame["info"] = frame["info"].map(lambda v: json.dumps(v, default=str))
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path
