"""What the run monitor shows, in plain Python (no ipywidgets import): a snapshot of a run taken
through its public API, every statistic from the run's :class:`~sandboxnb.results.Results`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxnb.scheduler import Run

__all__ = ["MonitorState"]


class MonitorState:
    """Numbers the run monitor shows, derived from a :class:`~sandboxnb.scheduler.Run`."""

    def __init__(self, run: Run, newest: int = 5) -> None:
        self.run = run
        self.newest = newest

    def snapshot(self) -> dict[str, Any]:
        run = self.run
        finished = run.done()  # read first: a run that ended has all its rows
        results = run.results
        return {
            "done": len(results),
            "total": results.total,
            "status": run.status,
            "counts": results.counts(),
            "mean_reward": results.mean_reward(),
            "rewards": results.rewards(),
            "newest": results.newest(self.newest),
            "finished": finished,
        }
