"""Executing a plan: every planned rollout, at most ``max_concurrent`` at once, structured.

:func:`bounded` returns only once every rollout it started has finished. If it is cancelled, the
rollouts in flight are cancelled and awaited (their sandboxes released) before the cancellation
propagates; if one raises, the others are cancelled the same way and that exception propagates.
Rollouts not started by then are not started. :func:`execute` runs a :class:`~sandboxnb.plan.Plan`
through it; :func:`sandboxnb.rollout.rollout` reports each started rollout's row on every path
(ok, error, timeout, cancelled).

A cancellation lost below (on Python 3.11 ``asyncio.wait_for`` drops one that arrives just as
the awaited operation completes) is still honoured: a lane whose task was asked to cancel takes
no further item, and a rollout whose acquisition swallowed it stops before the agent runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sandboxnb.errors import ConfigError
from sandboxnb.plan import Plan, PlannedRollout
from sandboxnb.rollout import rollout

if TYPE_CHECKING:
    from sandboxnb.pool import Pool

__all__ = ["Report", "bounded", "execute", "run_pool"]

T = TypeVar("T")
Report = Callable[[dict[str, Any]], None]


async def bounded(
    items: Sequence[T], work: Callable[[T], Awaitable[Any]], max_concurrent: int
) -> None:
    """Await ``work(item)`` for every item, in order, at most ``max_concurrent`` at once."""
    if max_concurrent < 1:
        raise ConfigError(f"max_concurrent = {max_concurrent!r}: expected an integer >= 1")
    pending = iter(items)

    async def lane() -> None:
        for item in pending:  # lanes share the iterator: each item is taken exactly once
            _raise_if_cancel_requested()
            await work(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(max_concurrent, len(items))):
                group.create_task(lane())
    except BaseExceptionGroup as group_error:  # one failure, not a group: the first one
        raise _first(group_error) from None


def _raise_if_cancel_requested() -> None:
    """Raise CancelledError if the current task was asked to cancel and the request was lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _first(group: BaseExceptionGroup) -> BaseException:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        error = stack.pop(0)
        if isinstance(error, BaseExceptionGroup):
            stack[:0] = list(error.exceptions)
        else:
            leaves.append(error)
    for kind in (KeyboardInterrupt, SystemExit, BaseException):
        for error in leaves:
            if isinstance(error, kind):
                return error
    return group


async def execute(plan: Plan, report: Report, *, run_id: str = "",
                  on_start: Callable[[PlannedRollout], None] | None = None,
                  pool: Pool | int | None = None, close_pool: bool | None = None) -> None:
    """Run every rollout of ``plan``, reporting each row to ``report`` (on the loop thread);
    ``on_start(item)`` is called as each rollout starts (its row reports its end).

    ``pool``: a warm :class:`~sandboxnb.pool.Pool` the rollouts of its config take their
    sandboxes from, or a size to make one for this run; it is closed at the end when made here or
    ``close_pool`` says so. Every sandbox a pool handed out is released before this returns.
    A provider the plan owns (made from a name) is closed at the end, on every path."""
    agent = plan.agent
    warm = run_pool(plan, pool)
    if close_pool is None:
        close_pool = warm is not pool
    acquire = None
    if warm is not None:
        await warm.start()
        acquire = warm.open

    async def guarded_agent(sandbox: Any, task: Any) -> Any:
        _raise_if_cancel_requested()  # lost while the sandbox was acquired: stop here
        return await agent(sandbox, task)

    async def one(item: PlannedRollout) -> None:
        if on_start is not None:
            on_start(item)
        await rollout(
            plan.provider,
            item.task,
            item.repeat,
            item.config,
            guarded_agent,
            run_id=run_id,
            timeout_s=plan.timeout_s,
            on_done=report,
            acquire=acquire,
        )

    try:
        await bounded(plan.rollouts, one, plan.max_concurrent)
    finally:
        try:
            if warm is not None and close_pool:  # the run's own
                await warm.aclose()
            elif warm is not None:
                await warm.drain()
        finally:
            if plan.owns_provider:
                await plan.provider.aclose()


def run_pool(plan: Plan, pool: Pool | int | None) -> Pool | None:
    """The pool a run takes its sandboxes from: the one given, or one of ``pool`` spares."""
    from sandboxnb.pool import Pool

    if pool is None or isinstance(pool, Pool):
        return pool
    return Pool(plan.provider, size=pool, config=_pool_config(plan))


def _pool_config(plan: Plan) -> Any:
    """The config most of the plan's rollouts get: the run's own, unless most of its tasks
    override it alike (the others acquire as usual)."""
    from collections import Counter

    if not plan.rollouts:
        return None
    return Counter(item.config for item in plan.rollouts).most_common(1)[0][0]
