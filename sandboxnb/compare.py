"""Comparing two runs task by task: the reward of each, which tasks flipped, with totals.

A task's reward in a run is its mean over that run's finished rollouts of it, an error or a
timeout counting 0 (as :meth:`~sandboxnb.results.Results.score` does); cancelled rollouts are
left out. A task *passes* when that reward is at least ``threshold`` (default 1.0: every rollout
of it fully solved).
"""

from __future__ import annotations

import math
import re
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxnb.errors import ConfigError
from sandboxnb.results import FAILED, Results, latest_rows, load, rows_to_frame

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Comparison", "compare"]

#: the values of the ``change`` column
CHANGES = ("pass->fail", "fail->pass", "same", "only in a", "only in b")


def _frame(source: Any, name: str) -> pd.DataFrame:
    """The rows of a Run, Results, DataFrame or journal path as a DataFrame, one per rollout."""
    import pandas as pd

    if isinstance(source, str | Path):
        return load(source).to_pandas()
    if isinstance(source, pd.DataFrame):
        missing = {"task_id", "reward", "status"} - set(source.columns)
        if missing:
            raise ConfigError(f"{name}: a DataFrame without column(s) {sorted(missing)}; "
                              "expected the rows of a run (run.to_pandas())")
        return source
    results = getattr(source, "results", source)
    if isinstance(results, Results):
        return rows_to_frame(latest_rows(results.rows))
    raise ConfigError(f"{name} = {type(source).__name__}: expected a Run, Results, a DataFrame "
                      "of rows or the path of a journal")


def _per_task(frame: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    status = frame["status"].astype(str)
    finished = frame[status.isin(["ok", *FAILED])].copy()
    finished["reward"] = pd.to_numeric(finished["reward"], errors="coerce").fillna(0.0)
    finished["failed"] = finished["status"].astype(str).isin(FAILED)
    grouped = finished.groupby("task_id", sort=False, observed=True)
    return pd.DataFrame({"reward": grouped["reward"].mean(), "rollouts": grouped.size(),
                         "failed": grouped["failed"].sum()})


class Comparison:
    """Two runs task by task. :attr:`table` has one row per task: ``reward_a``, ``reward_b``,
    ``delta``, ``failed_a``/``failed_b`` (errors and timeouts) and ``change`` (one of
    :data:`CHANGES`); :attr:`totals` the counts and mean rewards."""

    def __init__(self, table: pd.DataFrame, totals: dict[str, Any], names: tuple[str, str],
                 threshold: float) -> None:
        self.table = table
        self.totals = totals
        self.names = names
        self.threshold = threshold

    def flipped(self) -> pd.DataFrame:
        """The tasks that went from pass to fail or from fail to pass."""
        return self.table[self.table["change"].isin(["pass->fail", "fail->pass"])]

    def to_pandas(self) -> pd.DataFrame:
        return self.table

    def summary(self) -> str:
        t = self.totals
        a, b = self.names

        def mean(v: float) -> str:
            return "-" if math.isnan(v) else f"{v:.3f}"

        return (f"a = {a}, b = {b}: {t['tasks']} tasks, mean reward a {mean(t['reward_a'])} vs "
                f"b {mean(t['reward_b'])}; passed a {t['passed_a']} vs b {t['passed_b']}; "
                f"pass->fail {t['pass->fail']}, fail->pass {t['fail->pass']}; "
                f"only in a {t['only in a']}, only in b {t['only in b']}")

    def __repr__(self) -> str:
        flips = self.flipped()
        text = self.summary()
        if len(flips):
            text += "\n" + flips.to_string()
        return text

    def _repr_html_(self) -> str:
        flips = self.flipped()
        body = flips.to_html(float_format=lambda v: f"{v:.3f}") if len(flips) else \
            "<i>no task flipped</i>"
        return (f"<div><b>compare</b> {escape(self.summary())}<br>"
                f"<small>a task passes at reward &ge; {self.threshold:g}; rewards are means over "
                f"finished rollouts, errors and timeouts counting 0</small>{body}</div>")


def compare(a: Any, b: Any, *, threshold: float = 1.0) -> Comparison:
    """Compare run ``a`` with run ``b`` (each a Run, Results, DataFrame of rows or journal path)
    task by task; see :class:`Comparison`."""
    import pandas as pd

    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or \
            not math.isfinite(threshold):
        raise ConfigError(f"threshold = {threshold!r}: expected a number (the reward a task "
                          "needs to pass)")
    left, right = _per_task(_frame(a, "a")), _per_task(_frame(b, "b"))
    table = left.add_suffix("_a").join(right.add_suffix("_b"), how="outer")
    table = table.reindex(sorted(table.index, key=_natural))
    table.index.name = "task_id"
    table["delta"] = table["reward_b"] - table["reward_a"]
    pass_a, pass_b = table["reward_a"] >= threshold, table["reward_b"] >= threshold
    change = pd.Series("same", index=table.index)
    change[pass_a & ~pass_b] = "pass->fail"
    change[~pass_a & pass_b] = "fail->pass"
    change[table["reward_b"].isna()] = "only in a"
    change[table["reward_a"].isna()] = "only in b"
    table["change"] = change
    for col in ("rollouts_a", "rollouts_b", "failed_a", "failed_b"):
        table[col] = table[col].astype("Int64")
    table = table[["reward_a", "reward_b", "delta", "change", "failed_a", "failed_b",
                   "rollouts_a", "rollouts_b"]]
    both = table[table["reward_a"].notna() & table["reward_b"].notna()]
    counts = change.value_counts()
    totals = {
        "tasks": len(table),
        "both": len(both),
        "reward_a": float(both["reward_a"].mean()) if len(both) else math.nan,
        "reward_b": float(both["reward_b"].mean()) if len(both) else math.nan,
        "passed_a": int((both["reward_a"] >= threshold).sum()),
        "passed_b": int((both["reward_b"] >= threshold).sum()),
        **{name: int(counts.get(name, 0)) for name in CHANGES},
    }
    return Comparison(table, totals, (_name(a, "a"), _name(b, "b")), float(threshold))


def _natural(task_id: Any) -> list[Any]:
    """Sort key putting ``HumanEval/2`` before ``HumanEval/10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", str(task_id)) if part]


def _name(source: Any, default: str) -> str:
    if isinstance(source, str | Path):
        return Path(source).stem
    return str(getattr(source, "name", None) or default)
