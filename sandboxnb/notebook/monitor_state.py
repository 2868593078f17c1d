"""What the run monitor shows, in plain Python (no ipywidgets import): a snapshot of a run taken
through its public API, every statistic from the run's :class:`~sandboxnb.results.Results`.

The mean reward shown is :meth:`~sandboxnb.results.Results.score`: over every finished rollout,
an error or a timeout counting 0, with its denominator; the mean over graded rollouts only is
shown next to it when they differ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sandboxnb.results import FAILED

if TYPE_CHECKING:
    from sandboxnb.scheduler import Run

__all__ = ["COUNT_ORDER", "MonitorState", "bar_style"]

#: the order statuses are shown in
COUNT_ORDER = ("ok", "error", "timeout", "cancelled")


def bar_style(counts: dict[str, int], finished: bool, status: str) -> str:
    """The progress bar's colour: red with errors, orange with timeouts or a run that did not end
    ``done``, green only for a finished run where every rollout was graded, else neutral."""
    if counts.get("error"):
        return "danger"
    if counts.get("timeout") or counts.get("cancelled") or (finished and status != "done"):
        return "warning"
    return "success" if finished else ""


class MonitorState:
    """Numbers the run monitor shows, derived from a :class:`~sandboxnb.scheduler.Run`."""

    def __init__(self, run: Run, newest: int = 5, errors: int = 5, oldest: int = 3) -> None:
        self.run = run
        self.newest = newest
        self.errors = errors
        self.oldest = oldest

    def snapshot(self) -> dict[str, Any]:
        run = self.run
        finished = run.done()  # read first: a run that ended has all its rows
        results = run.results
        rows = list(results.rows)
        counts = results.counts()
        ordered = {k: counts[k] for k in COUNT_ORDER if k in counts}
        ordered |= {k: v for k, v in counts.items() if k not in ordered}
        score, scored = results.score()
        rewards = results.rewards()
        in_flight = run.in_flight() if hasattr(run, "in_flight") else []
        elapsed = float(getattr(run, "elapsed_s", 0.0) or 0.0)
        previous = len(getattr(run.plan, "previous", ())) if hasattr(run, "plan") else 0
        here = max(0, len(rows) - previous)  # rows this run made (not a resumed journal's)
        rate = here / elapsed if elapsed > 0 and here else math.nan
        remaining = max(0, results.total - len(rows))
        if not remaining:
            eta = 0.0
        elif finished or math.isnan(rate):
            eta = math.nan
        else:
            eta = remaining / rate
        return {
            "name": run.name,
            "done": len(rows),
            "total": results.total,
            "status": run.status,
            "counts": ordered,
            "failed": sum(counts.get(k, 0) for k in FAILED),
            "score": score,
            "scored": scored,
            "mean_reward": results.mean_reward(),
            "graded": len(rewards),
            "rewards": rewards,
            "durations": [float(r["duration_s"]) for r in rows
                          if isinstance(r.get("duration_s"), int | float)
                          and not math.isnan(r["duration_s"])],
            "newest": results.newest(self.newest),
            "errors": [r for r in reversed(rows) if r.get("status") in FAILED][: self.errors],
            "elapsed_s": elapsed,
            "rate": rate,
            "eta_s": eta,
            "in_flight": len(in_flight),
            "oldest": in_flight[: self.oldest],
            "finished": finished,
            "bar_style": bar_style(counts, finished, run.status),
        }
