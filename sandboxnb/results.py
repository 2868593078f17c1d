"""Result rows and the statistics over them.

:class:`Results` is the one implementation of "rows so far, counts by status, mean reward, tidy
DataFrame": a live :class:`~sandboxnb.scheduler.Run` holds one, :func:`sandboxnb.load` returns
one read from a journal, and the monitor widget and the CLI read theirs.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxnb.journal import STATUSES, encode_row, read_entries

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COLUMNS",
    "FAILED",
    "FAILURE_COLUMNS",
    "STATUSES",
    "Results",
    "latest_rows",
    "load",
    "rows_to_frame",
    "write_rows",
]

COLUMNS = [
    "run_id",
    "task_id",
    "repeat",
    "provider",
    "sandbox_id",
    "status",
    "reward",
    "error",
    "error_type",
    "phase",
    "traceback",
    "output_tail",
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
_CATEGORICAL = ["provider", "status", "image", "gpu", "phase"]
#: the statuses of a rollout that finished without a grade (they count 0 in :meth:`Results.score`)
FAILED = ("error", "timeout")
#: what :meth:`Results.errors` shows of each failed rollout
FAILURE_COLUMNS = ["task_id", "repeat", "status", "phase", "error_type", "error", "traceback",
                   "output_tail", "duration_s", "sandbox_id"]


def latest_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rollout, ``(task_id, repeat)``: the latest one (a retried rollout's new row
    replaces the old), in the order the kept rows finished."""
    latest: dict[tuple[Any, Any], int] = {}
    rows = list(rows)
    for index, row in enumerate(rows):
        latest[(row.get("task_id"), row.get("repeat"))] = index
    return [rows[i] for i in sorted(latest.values())]


def is_reward(value: Any) -> bool:
    """True for a graded reward: a real number that is not NaN (``None``/NaN mean ungraded)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


class Results:
    """Rollout rows (dicts with the :data:`COLUMNS` keys) and the statistics over them.

    Rows are only ever appended (on the event loop thread of a live run); every reader works on
    a snapshot, so reading from another thread (a widget callback) is safe.
    """

    def __init__(
        self,
        rows: Iterable[dict[str, Any]] = (),
        *,
        total: int | None = None,
        name: str = "results",
        header: dict[str, Any] | None = None,
    ) -> None:
        self._rows: list[dict[str, Any]] = list(rows)
        self._total = total
        self.name = name
        #: what the run was, from a journal's header (None for a live run or an old journal)
        self.header = header

    # -- rows ------------------------------------------------------------------------------
    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows in the order they finished (the live list: treat it as read-only)."""
        return self._rows

    def add(self, row: dict[str, Any]) -> None:
        """Append one finished rollout's row."""
        self._rows.append(row)

    @property
    def total(self) -> int:
        """Rollouts expected in all (at least the rows held)."""
        return max(self._total or 0, len(self._rows))

    @property
    def run_id(self) -> str | None:
        return self._rows[0].get("run_id") if self._rows else None

    @property
    def provider(self) -> str | None:
        return self._rows[0].get("provider") if self._rows else None

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._rows))

    # -- statistics ------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of rows by status, in alphabetical order of status."""
        return dict(sorted(Counter(row.get("status") for row in list(self._rows)).items()))

    def rewards(self) -> list[float]:
        """The rewards of graded rows, in row order."""
        return [float(r["reward"]) for r in list(self._rows) if is_reward(r.get("reward"))]

    def mean_reward(self) -> float:
        """Mean reward over graded rows (NaN if none); see :meth:`score` for the mean over every
        finished rollout."""
        rewards = self.rewards()
        return sum(rewards) / len(rewards) if rewards else math.nan

    def score(self) -> tuple[float, int]:
        """``(mean, n)``: the mean reward over the ``n`` finished rollouts, where an error or a
        timeout counts 0 (cancelled rollouts are left out: they did not finish). NaN if none."""
        finished = [r for r in list(self._rows) if r.get("status") in ("ok", *FAILED)]
        total = sum(float(r["reward"]) for r in finished if is_reward(r.get("reward")))
        return (total / len(finished) if finished else math.nan), len(finished)

    def failed(self) -> list[dict[str, Any]]:
        """The rows of failed rollouts (error, timeout), in row order."""
        return [r for r in list(self._rows) if r.get("status") in FAILED]

    def errors(self) -> pd.DataFrame:
        """The failed rollouts (error, timeout) as a DataFrame: :data:`FAILURE_COLUMNS`."""
        return rows_to_frame(self.failed())[FAILURE_COLUMNS].reset_index(drop=True)

    def newest(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` most recently finished rows, newest first."""
        return list(self._rows[-n:])[::-1] if n > 0 else []

    def summary(self) -> str:
        """One line: rows of total, rows by status, the mean reward over finished rollouts
        (errors and timeouts count 0) and, when some failed, over graded ones."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items()) or "no rows"
        return f"{len(self._rows)}/{self.total} rollouts ({counts}); {self.reward_text()}"

    def reward_text(self) -> str:
        """``mean reward 0.700 over 164 rollouts (errors and timeouts count 0; 0.764 over 150
        graded)``; the part in brackets only when some rollouts failed."""
        score, finished = self.score()
        if not finished:
            return "mean reward -"
        text = f"mean reward {score:.3f} over {finished} rollouts"
        graded = self.rewards()
        if len(graded) < finished:
            mean = f"{sum(graded) / len(graded):.3f}" if graded else "-"
            text += f" (errors and timeouts count 0; {mean} over {len(graded)} graded)"
        return text

    # -- export ----------------------------------------------------------------------------
    def to_pandas(self) -> pd.DataFrame:
        """The rows as a tidy DataFrame (see :func:`rows_to_frame`)."""
        return rows_to_frame(list(self._rows))

    def write(self, path: str | Path) -> Path:
        """Write the rows to ``path`` as .jsonl, .csv or .parquet (by extension)."""
        return write_rows(list(self._rows), path)

    def __repr__(self) -> str:
        return f"<Results {self.name}: {self.summary()}>"


def load(journal: str | Path) -> Results:
    """Read a journal back into :class:`Results`: one row per rollout, the latest (a retried
    rollout's new row replaces the old); a torn last line is skipped; ``header`` says what the
    run was. A line that is not a header or a well-typed row raises
    :class:`~sandboxnb.errors.ConfigError` naming it."""
    header, rows = read_entries(journal)
    return Results(latest_rows(rows), name=Path(journal).stem, header=header)


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
    frame["status"] = frame["status"].cat.set_categories(list(STATUSES))
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
        path.write_text("".join(encode_row(row) for row in rows), encoding="utf-8")
        return path
    frame = rows_to_frame(rows)
    frame["info"] = frame["info"].map(lambda v: json.dumps(v, default=str))
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path
