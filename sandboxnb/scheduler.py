"""The user's handle on a run, and the entry points ``run`` / ``start``.

``await run(...)`` waits for the whole run; ``start(...)`` returns the :class:`Run` at once with
its work scheduled on the running event loop (a notebook keeps executing cells meanwhile).
The pieces behind it: :mod:`sandboxnb.plan` validates and plans (before any sandbox starts),
:mod:`sandboxnb.runner` executes with bounded, structured concurrency, :mod:`sandboxnb.results`
holds the rows and their statistics, :mod:`sandboxnb.journal` makes each row durable.
Cancelling a run (or an error in the engine itself) releases every sandbox before the run
reports that it ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxnb.agents import Agent
from sandboxnb.config import ConfigError, RuntimeConfig, merge_config
from sandboxnb.journal import Journal
from sandboxnb.options import parse_count
from sandboxnb.plan import Plan, PlannedRollout, make_plan
from sandboxnb.providers import Provider
from sandboxnb.results import Results
from sandboxnb.retry import Recipe, retry_statuses, with_retries
from sandboxnb.runner import execute, run_pool
from sandboxnb.tasks import Task, Taskset

if TYPE_CHECKING:
    import pandas as pd

    from sandboxnb.pool import Pool

__all__ = ["Run", "active_runs", "run", "start"]

log = logging.getLogger("sandboxnb.scheduler")
Listener = Callable[[dict[str, Any]], None]
DoneCallback = Callable[["Run"], None]
#: the statuses of a run that has ended (everything released, journal closed)
ENDED = ("done", "cancelled", "failed")
_ACTIVE: set[Run] = set()


def active_runs() -> list[Run]:
    """Runs started in this process that have not ended (for shutdown hooks and monitors)."""
    return list(_ACTIVE)


class Run:
    """A run of a :class:`~sandboxnb.plan.Plan`: its status, its rows as they arrive and the way
    to wait for, observe or cancel its end.

    ``status`` is ``pending``, ``running``, then one of ``done``, ``cancelled``, ``failed``; it
    takes its final value only once every sandbox is released and the journal is closed.
    """

    def __init__(self, plan: Plan, recipe: Recipe | None = None,
                 pool: Pool | int | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.plan = plan
        self.name = plan.name
        self.results = Results(plan.previous, total=plan.total, name=plan.name)
        self.status = "pending"
        self.provider_name = plan.provider.name
        self.journal_path: Path | None = plan.journal
        self.started_at: datetime | None = None
        self.wall_s: float | None = None
        self.error: BaseException | None = None
        self._journal: Journal | None = None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._done_callbacks: list[DoneCallback] = []
        self._ended: concurrent.futures.Future[Run] = concurrent.futures.Future()
        self._ended.set_running_or_notify_cancel()  # only _finish completes it
        self._recipe = recipe
        #: the warm pool the rollouts take their sandboxes from (``pool.stats()`` for monitors);
        #: one made from a size belongs to this run and is closed when it ends
        self._pool_size = pool if isinstance(pool, int) else None
        self.pool: Pool | None = run_pool(plan, pool)
        #: (task_id, repeat) -> (monotonic start, wall-clock start) of each rollout in flight
        self._in_flight: dict[tuple[str, int], tuple[float, datetime]] = {}
        self._began: float | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Run:
        """Schedule the run on the running event loop and return at once. Opens the journal
        here, so a journal that cannot be written fails before anything runs."""
        if self._task is not None or self.status != "pending":
            return self
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "sandboxnb.start() needs a running event loop (a notebook cell or async code); "
                "from synchronous code use asyncio.run(sandboxnb.run(...))"
            ) from None
        _check_journal_free(self.plan.journal)
        if self.plan.journal is not None:
            self._journal = Journal(self.plan.journal, header=self.plan.header,
                                    expect=self.plan.journal_stamp)
        self.status = "running"
        self._began = time.monotonic()
        self.started_at = datetime.now(UTC)
        self._task = loop.create_task(self._execute())
        _ACTIVE.add(self)
        return self

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the run executes on (None until started)."""
        return self._task.get_loop() if self._task is not None else None

    def cancel(self) -> None:
        """Stop the run (thread-safe): in-flight rollouts are cancelled and their sandboxes
        released; rollouts not started yet never start."""
        task = self._task
        if task is not None:
            if not task.done():
                try:
                    task.get_loop().call_soon_threadsafe(task.cancel)
                except RuntimeError:  # the loop is closed: nothing runs any more
                    pass
        elif self.status == "pending":
            self._finish("cancelled")

    def done(self) -> bool:
        """True once the run has ended: every sandbox released, the journal closed."""
        return self._ended.done()

    async def wait(self) -> Run:
        """Start the run if it is pending and wait until it ended, from any event loop.

        Never raises the run's own error (see ``status`` and ``error``); cancelling the caller
        does not cancel the run."""
        if self.status == "pending":
            self.start()
        await asyncio.shield(asyncio.wrap_future(self._ended))
        return self

    def __await__(self):
        return self._outcome().__await__()

    async def _outcome(self) -> Run:
        await self.wait()
        if self.status == "failed" and self.error is not None:
            raise self.error
        return self

    def add_done_callback(self, fn: DoneCallback) -> Callable[[], None]:
        """Call ``fn(run)`` once the run has ended (on the run's loop thread), or right away
        if it already has. Thread-safe; returns a function that removes the callback."""
        with self._lock:
            if not self._ended.done():
                self._done_callbacks.append(fn)
                return lambda: self._remove_done_callback(fn)
        self._call(fn)
        return lambda: None

    def _remove_done_callback(self, fn: DoneCallback) -> None:
        with self._lock:
            if fn in self._done_callbacks:
                self._done_callbacks.remove(fn)

    def _call(self, fn: DoneCallback) -> None:
        try:
            fn(self)
        except Exception:  # a broken observer must not break the run's ending
            log.exception("run %s: done callback %r failed", self.id, fn)

    async def _execute(self) -> None:
        began = time.perf_counter()
        status, error = "failed", None
        try:
            await execute(self.plan, self._record, run_id=self.id, on_start=self._started,
                          pool=self.pool, close_pool=self._pool_size is not None)
            status = "done"
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as err:  # a bug in the engine itself, or a journal write failing
            error = err
        finally:
            try:
                await self._close_journal()
            except Exception as err:
                status, error = "failed", error or err
            self.wall_s = time.perf_counter() - began
            _ACTIVE.discard(self)
            self.error = error
            self._finish(status)

    async def _close_journal(self) -> None:
        """Wait until every row is on disk and close the journal, off the loop thread; a second
        cancellation meanwhile does not skip it."""
        journal = self._journal
        if journal is None:
            return
        try:
            closing = asyncio.get_running_loop().run_in_executor(None, journal.close)
        except RuntimeError:  # interpreter shutting down: executors refuse work
            journal.close()
            return
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            journal.close()  # idempotent: waits for the same writer to drain

    def _finish(self, status: str) -> None:
        self.status = status
        with self._lock:
            callbacks, self._done_callbacks = self._done_callbacks, []
            self._ended.set_result(self)
        for fn in callbacks:
            self._call(fn)

    def _started(self, item: PlannedRollout) -> None:
        self._in_flight[(item.task.id, item.repeat)] = (time.monotonic(), datetime.now(UTC))

    def _record(self, row: dict[str, Any]) -> None:
        self._in_flight.pop((row.get("task_id"), row.get("repeat")), None)
        self.results.add(row)
        if self._journal is not None:
            self._journal.append(row)
        for listener in list(self._listeners):
            try:
                listener(row)
            except Exception:  # a broken display must not stop the run or lose the row
                log.exception("run %s: listener %r failed", self.id, listener)

    # -- observation -----------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(row)`` on the loop thread for each new row; returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows so far (see :attr:`results`)."""
        return self.results.rows

    @property
    def total(self) -> int:
        """Rollouts of the whole run (a resumed journal's rows included)."""
        return self.results.total

    @property
    def max_concurrent(self) -> int:
        return self.plan.max_concurrent

    @property
    def timeout_s(self) -> float | None:
        return self.plan.timeout_s

    def counts(self) -> dict[str, int]:
        """Number of rows by status."""
        return self.results.counts()

    def mean_reward(self) -> float:
        """Mean reward over graded rows (NaN if none)."""
        return self.results.mean_reward()

    def to_pandas(self) -> pd.DataFrame:
        """The rows so far as a tidy DataFrame (see :func:`sandboxnb.results.rows_to_frame`)."""
        return self.results.to_pandas()

    def errors(self) -> pd.DataFrame:
        """The failed rollouts (error, timeout) so far: task, repeat, status, phase, error type,
        one-line error, the user's traceback, the sandbox's last output, duration, sandbox."""
        return self.results.errors()

    def in_flight(self) -> list[dict[str, Any]]:
        """The rollouts running now, oldest first: ``task_id``, ``repeat``, ``started_at``
        (UTC) and ``age_s``. Safe from any thread."""
        now = time.monotonic()
        running = sorted(dict(self._in_flight).items(), key=lambda item: item[1][0])
        return [{"task_id": task_id, "repeat": repeat, "started_at": wall, "age_s": now - began}
                for (task_id, repeat), (began, wall) in running]

    def task(self, task_id: str) -> Task | None:
        """The task of this run with id ``task_id`` (None if it has none)."""
        for item in self.plan.rollouts:
            if item.task.id == task_id:
                return item.task
        if self._recipe is not None:
            for task in self._recipe.tasks:
                if task.id == task_id:
                    return task
        return None

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started (its wall time once it ended; 0 before it starts)."""
        if self.wall_s is not None:
            return self.wall_s
        return time.monotonic() - self._began if self._began is not None else 0.0

    def retry(
        self,
        status: str | Iterable[str] = ("error", "timeout"),
        *,
        max_concurrent: int | None = None,
        timeout_s: float | str | None = "same",
        progress: bool = False,
    ) -> Run:
        """Run again the rollouts whose latest row has one of ``status`` (by default the failed
        ones), into the same journal, and return the new :class:`Run` (started: ``await`` it).

        The new run's results hold one row per rollout: the kept rows of this run and the new
        rows of the retried ones; :func:`sandboxnb.load` of the journal gives the same (it keeps
        the latest row per rollout). This run must have ended. ``max_concurrent`` and
        ``timeout_s`` default to this run's. After a kernel restart, use
        ``sandboxnb.start(taskset, agent, journal=PATH, resume=True, retry=("error", "timeout"))``.
        """
        statuses = retry_statuses(status)
        if not self.done():
            raise RuntimeError(f"run {self.name} ({self.id}) is {self.status}: wait for it to "
                               "end (await run) or cancel it before retrying its rollouts")
        stamp = self._journal.final_stamp if self._journal is not None else None
        plan = with_retries(dataclasses.replace(self.plan, rollouts=(), journal_stamp=stamp),
                            self.results.rows,
                            statuses, self._recipe, self.plan.rollouts)
        changes: dict[str, Any] = {}
        if max_concurrent is not None:
            changes["max_concurrent"] = parse_count(max_concurrent, "max_concurrent")
        if timeout_s != "same":
            if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(
                    timeout_s, int | float) or not math.isfinite(timeout_s) or timeout_s <= 0):
                raise ConfigError(f"timeout_s = {timeout_s!r}: expected a number of seconds > 0 "
                                  "or None")
            changes["timeout_s"] = timeout_s
        pool = self._pool_size if self._pool_size is not None else self.pool
        retried = Run(dataclasses.replace(plan, **changes), self._recipe, pool).start()
        if progress:
            from sandboxnb.progress import progress_bar

            progress_bar(retried)
        return retried

    def summary(self) -> str:
        """One line: rows by status, mean reward, wall time and status."""
        wall = f"{self.wall_s:.1f}s" if self.wall_s is not None else "-"
        return f"{self.results.summary()}; wall {wall}; status {self.status}"

    def __repr__(self) -> str:
        return f"<Run {self.name} {self.id}: {self.summary()}>"


def _check_pool(pool: Any, runtime: str | Provider) -> Pool | int | None:
    """``pool`` as a run takes it: None, a size from 1 to 1000, or an open Pool of the run's
    provider (ConfigError naming the value otherwise)."""
    from sandboxnb.pool import Pool, parse_pool_size

    if pool is None:
        return None
    if not isinstance(pool, Pool):
        return parse_pool_size(pool)
    if pool.closed:
        raise ConfigError(f"pool = {pool!r} is closed; pass an open Pool or a size")
    name = runtime.name if isinstance(runtime, Provider) else runtime
    if pool.provider.name != name:
        raise ConfigError(f"pool = {pool!r} holds {pool.provider.name!r} sandboxes but runtime "
                          f"= {name!r}; pass a pool of the run's provider")
    return pool


def _check_journal_free(path: Path | None) -> None:
    """Refuse to start a second run appending to the journal of a run still running."""
    if path is None:
        return
    for other in list(_ACTIVE):
        if other.journal_path is not None and other.journal_path.resolve() == path.resolve():
            raise ConfigError(f"journal = {str(path)!r} is being written by another run, "
                              f"{other.name} ({other.id}) in this process, which is "
                              f"{other.status}: wait for it to end")


TasksetLike = str | Path | Taskset | Iterable[Task | Mapping[str, Any]]


def start(
    taskset: TasksetLike,
    agent: str | Agent,
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | Mapping[str, Any] | None = None,
    max_concurrent: int = 8,
    repeats: int = 1,
    timeout_s: float | None = None,
    journal: str | Path | None = "auto",
    resume: bool | str = False,
    progress: bool = False,
    retry: str | Iterable[str] | None = None,
    pool: Pool | int | None = None,
) -> Run:
    """Validate everything, then schedule a run on the running loop and return it at once.

    ``journal`` names a JSONL file that gets every row as soon as it finishes (fsynced), so a
    crashed kernel loses nothing. The default, ``"auto"``, writes a new file under ``./runs/``
    (or ``$SANDBOXNB_RUNS_DIR``); ``None`` turns journaling off. An existing journal is refused
    unless ``resume=True``, which keeps its rows and runs only the (task, repeat) pairs it does
    not hold yet; the journal's header must show the same run (taskset and its tasks, agent,
    runtime, config), which may grow (more tasks, more repeats), and ``resume="force"``
    continues it even if not. One run writes a journal at a time: another one writing it (in
    this process or another) is a :class:`ConfigError`.
    ``retry=("error", "timeout")`` also runs again the rollouts whose latest row in it has one
    of those statuses (a retry after a kernel restart). ``progress=True`` shows a text
    progress bar. ``pool=N`` keeps N sandboxes of the run's config ready (made when the run
    starts, released when it ends); a :class:`~sandboxnb.pool.Pool` is shared across runs.
    Every rollout still gets a fresh sandbox.
    """
    pool = _check_pool(pool, runtime)
    statuses = retry_statuses(retry) if retry is not None else ()
    if statuses and not resume:
        raise ConfigError(f"retry = {retry!r} reruns rollouts of an existing journal, but resume = "
                         f"{resume!r}; pass resume=True and the journal's path")
    tasks = Taskset.load(taskset)
    plan = make_plan(
        tasks,
        agent,
        runtime,
        config=config,
        max_concurrent=max_concurrent,
        repeats=repeats,
        timeout_s=timeout_s,
        journal=journal,
        resume=resume,
    )
    recipe = Recipe(tasks, merge_config(RuntimeConfig(), config), repeats)
    if statuses:
        plan = with_retries(plan, plan.previous, statuses, recipe)
    run_obj = Run(plan, recipe, pool).start()
    if progress:
        from sandboxnb.progress import progress_bar

        progress_bar(run_obj)
    return run_obj


async def run(
    taskset: TasksetLike,
    agent: str | Agent,
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | Mapping[str, Any] | None = None,
    max_concurrent: int = 8,
    repeats: int = 1,
    timeout_s: float | None = None,
    journal: str | Path | None = "auto",
    resume: bool | str = False,
    progress: bool = True,
    retry: str | Iterable[str] | None = None,
    pool: Pool | int | None = None,
) -> Run:
    """Run every task ``repeats`` times, each rollout in a fresh sandbox; return the :class:`Run`.

    A failing rollout becomes a row with its error and the run goes on. If this coroutine is
    cancelled, the run is cancelled and every sandbox is released before it returns.
    ``pool``: see :func:`start`.
    """
    run_obj = start(
        taskset,
        agent,
        runtime,
        config=config,
        max_concurrent=max_concurrent,
        repeats=repeats,
        timeout_s=timeout_s,
        journal=journal,
        resume=resume,
        progress=progress,
        retry=retry,
        pool=pool,
    )
    try:
        return await run_obj
    except asyncio.CancelledError:
        run_obj.cancel()
        await run_obj.wait()
        raise
