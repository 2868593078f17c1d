"""Running failed rollouts again: the plan of a retry.

A retry reruns the rollouts whose latest row has one of the chosen statuses (by default error
and timeout) into the same journal; the rows of every other rollout are kept as the new run's
previous rows, so its results (and :func:`sandboxnb.load` of the journal, which keeps the latest
row per rollout) hold one row per rollout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from sandboxnb.config import ConfigError, RuntimeConfig
from sandboxnb.plan import Plan, PlannedRollout, expand
from sandboxnb.providers import Provider, get_provider
from sandboxnb.results import FAILED, STATUSES, latest_rows
from sandboxnb.tasks import Taskset

__all__ = ["Recipe", "retry_statuses", "with_retries"]

Key = tuple[Any, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a run was made from, to plan any of its rollouts again."""

    tasks: Taskset
    config: RuntimeConfig
    repeats: int

    def rollouts(self, provider: Provider) -> list[PlannedRollout]:
        return expand(self.tasks, provider, self.config, self.repeats)


def retry_statuses(status: str | Iterable[str] | None) -> tuple[str, ...]:
    """The statuses to retry, checked: a status name or several (default: error, timeout)."""
    if status is None:
        return FAILED
    chosen = (status,) if isinstance(status, str) else tuple(status)
    wrong = [s for s in chosen if s not in STATUSES or s == "ok"]
    if not chosen or wrong:
        raise ConfigError(f"status = {status!r}: expected one or more of error, timeout, "
                          "cancelled (the statuses of rollouts to run again)")
    return chosen


def _key(row: Mapping[str, Any]) -> Key:
    return row.get("task_id"), row.get("repeat")


def with_retries(plan: Plan, rows: Iterable[dict[str, Any]], statuses: tuple[str, ...],
                 recipe: Recipe | None, known: Iterable[PlannedRollout] = ()) -> Plan:
    """``plan`` plus the rollouts of ``rows`` whose latest row has one of ``statuses``; their
    old rows leave ``previous``. A provider the plan owned (closed when it ended) is made anew.
    Rollouts are found in ``recipe`` or ``known``; one found in neither is an error."""
    provider = get_provider(plan.provider.name) if plan.owns_provider else plan.provider
    latest = latest_rows(rows)
    again = {_key(r) for r in latest if r.get("status") in statuses}
    candidates = list(known) + (recipe.rollouts(provider) if recipe is not None else [])
    found: dict[Key, PlannedRollout] = {}
    for item in candidates:
        found.setdefault((item.task.id, item.repeat), item)
    missing = sorted(again - found.keys(), key=str)
    if missing:
        raise ConfigError(f"cannot retry {len(missing)} rollout(s) {missing[:3]}: their tasks "
                          "are not part of this run's taskset")
    retried = [item for key, item in found.items() if key in again]
    return dataclasses.replace(
        plan,
        rollouts=(*plan.rollouts, *retried),
        previous=tuple(r for r in latest if _key(r) not in again),
        provider=provider,
        header=None,  # the journal already says what the run is
    )
