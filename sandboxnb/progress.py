"""A text progress bar (tqdm) over a run, fed only by the run's public observation API."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxnb.scheduler import Run

__all__ = ["progress_bar"]


def progress_bar(run: Run) -> Any:
    """Show a tqdm bar that advances with every row and closes however the run ends."""
    from tqdm.auto import tqdm

    results = run.results
    bar = tqdm(total=run.total, initial=len(results), desc=run.name, unit="rollout")

    def update(_row: dict[str, Any]) -> None:
        mean = results.mean_reward()
        bar.update(1)
        bar.set_postfix(
            results.counts() | {"reward": "-" if math.isnan(mean) else f"{mean:.3f}"},
            refresh=False,
        )

    unsubscribe = run.subscribe(update)

    def close(_run: Run) -> None:
        unsubscribe()
        bar.close()

    run.add_done_callback(close)
    return bar
