"""The plan of a run: every (task, repeat) to roll out with its effective config, validated.

:func:`make_plan` resolves and checks everything a run needs (taskset, agent, provider, config
for every task, concurrency, repeats, deadline, journal) and raises before any sandbox starts;
each error names the field, the value and what is accepted. Resuming a journal keeps its rows and
plans only the (task, repeat) pairs it does not hold yet (a ``cancelled`` row is planned again).
Making a plan has no side effect on disk: the journal is opened when the run starts.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandboxnb.agents import Agent, resolve_agent
from sandboxnb.config import ConfigError, RuntimeConfig, merge_config
from sandboxnb.journal import read_journal
from sandboxnb.providers import Provider, get_provider
from sandboxnb.results import latest_rows
from sandboxnb.tasks import Task, Taskset

__all__ = ["Plan", "PlannedRollout", "expand", "make_plan", "resumable_rows"]

TasksetLike = str | Path | Taskset | Iterable[Task | Mapping[str, Any]]


@dataclass(frozen=True)
class PlannedRollout:
    """One rollout to run: a task, its repeat index and the config its sandbox gets."""

    task: Task
    repeat: int
    config: RuntimeConfig


@dataclass(frozen=True)
class Plan:
    """Everything a run executes, validated. ``previous`` are the rows of a resumed journal."""

    name: str
    rollouts: tuple[PlannedRollout, ...]
    agent: Agent
    provider: Provider
    owns_provider: bool
    max_concurrent: int
    timeout_s: float | None = None
    journal: Path | None = None
    previous: tuple[dict[str, Any], ...] = ()

    @property
    def total(self) -> int:
        """Rollouts of the whole run: those already journaled plus those to run."""
        return len(self.rollouts) + len(self.previous)


def expand(
    taskset: Iterable[Task],
    provider: Provider,
    base: RuntimeConfig,
    repeats: int,
    skip: Iterable[tuple[str, int]] = (),
) -> list[PlannedRollout]:
    """Every (task, repeat) not in ``skip``, in taskset order, with the task's overrides merged
    into ``base`` and checked against what ``provider`` honours."""
    skip = set(skip)
    planned = []
    for task in taskset:
        try:
            config = provider.check(task.effective_config(base))
        except ConfigError as err:
            if task.runtime:  # name the task whose overrides made the config invalid
                raise ConfigError(f"task {task.id!r}: {err}") from err
            raise
        planned += [
            PlannedRollout(task, repeat, config)
            for repeat in range(repeats)
            if (task.id, repeat) not in skip
        ]
    return planned


def resumable_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a journal a resumed run keeps: the latest row of every finished rollout (ok,
    error, timeout; see :func:`~sandboxnb.results.latest_rows`); cancelled rollouts run again."""
    return [row for row in latest_rows(rows) if row.get("status") != "cancelled"]


def make_plan(
    taskset: TasksetLike,
    agent: str | Agent,
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | Mapping[str, Any] | None = None,
    max_concurrent: int = 8,
    repeats: int = 1,
    timeout_s: float | None = None,
    journal: str | Path | None = "auto",
    resume: bool = False,
) -> Plan:
    """Validate a run and plan its rollouts (see :func:`sandboxnb.run` for the arguments)."""
    max_concurrent = _positive_int("max_concurrent", max_concurrent)
    repeats = _positive_int("repeats", repeats)
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ConfigError(f"timeout_s = {timeout_s!r}: expected a number of seconds > 0 or None")
    tasks = Taskset.load(taskset)
    agent_fn = resolve_agent(agent)
    base = merge_config(RuntimeConfig(), config)
    provider = get_provider(runtime)
    path = _journal_path(journal, resume, tasks.name)
    previous: list[dict[str, Any]] = []
    if path is not None and path.exists() and path.stat().st_size > 0:
        if not resume:
            raise FileExistsError(
                f"journal = {str(path)!r} already holds results; pass resume=True "
                "(CLI: --resume) to continue it, or choose a new path"
            )
        previous = resumable_rows(read_journal(path))
        _check_same_run(path, previous, tasks, repeats)
    done = {(row.get("task_id"), _as_int(row.get("repeat"))) for row in previous}
    return Plan(
        name=tasks.name,
        rollouts=tuple(expand(tasks, provider, base, repeats, done)),
        agent=agent_fn,
        provider=provider,
        owns_provider=not isinstance(runtime, Provider),
        max_concurrent=max_concurrent,
        timeout_s=timeout_s,
        journal=path,
        previous=tuple(previous),
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r}: expected an integer >= 1")
    return value


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_same_run(path: Path, rows: list[dict[str, Any]], tasks: Taskset,
                    repeats: int) -> None:
    """Refuse to resume a journal that holds rollouts this run would never make."""
    ids = {task.id for task in tasks}
    foreign = sorted({str(row.get("task_id")) for row in rows} - ids)
    if foreign:
        shown = ", ".join(repr(t) for t in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ConfigError(
            f"journal = {str(path)!r} holds rows of {len(foreign)} task(s) that taskset "
            f"{tasks.name!r} does not have ({shown}): it belongs to another run; resume it with "
            "its own taskset, or choose a new journal path")
    beyond = sorted({_as_int(row.get("repeat")) for row in rows} - set(range(repeats)),
                    key=lambda r: -1 if r is None else r)
    if beyond:
        raise ConfigError(
            f"journal = {str(path)!r} holds repeat(s) {beyond} but repeats = {repeats}; resume "
            "with the repeats it was started with, or choose a new journal path")


def _journal_path(journal: Any, resume: bool, name: str) -> Path | None:
    if resume and (journal is None or journal == "auto"):
        raise ConfigError(
            f"resume = True continues an existing journal, but journal = {journal!r}; "
            "accepted: the path of the journal to continue (CLI: --journal PATH)"
        )
    if journal is None:
        return None
    if journal == "auto":
        return _auto_journal_path(name)
    if not isinstance(journal, str | os.PathLike) or not str(journal):
        raise ConfigError(
            f"journal = {journal!r}: expected a file path, 'auto' (a new file under ./runs) "
            "or None (no journal)"
        )
    return Path(journal)


def _auto_journal_path(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    directory = Path(os.environ.get("SANDBOXNB_RUNS_DIR", "runs"))
    return directory / f"{safe}-{stamp}-{uuid.uuid4().hex[:6]}.jsonl"
