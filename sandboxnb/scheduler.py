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
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxnb.agents import Agent
from sandboxnb.config import RuntimeConfig
from sandboxnb.journal import Journal
from sandboxnb.plan import Plan, make_plan
from sandboxnb.providers import Provider
from sandboxnb.results import Results
from sandboxnb.runner import execute
from sandboxnb.tasks import Task, Taskset

if TYPE_CHECKING:
    import pandas as pd

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

    def __init__(self, plan: Plan) -> None:
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
        if self.plan.journal is not None:
            self._journal = Journal(self.plan.journal, header=self.plan.header)
        self.status = "running"
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
            await execute(self.plan, self._record, run_id=self.id)
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

    def _record(self, row: dict[str, Any]) -> None:
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

    def summary(self) -> str:
        """One line: rows by status, mean reward, wall time and status."""
        wall = f"{self.wall_s:.1f}s" if self.wall_s is not None else "-"
        return f"{self.results.summary()}; wall {wall}; status {self.status}"

    def __repr__(self) -> str:
        return f"<Run {self.name} {self.id}: {self.summary()}>"


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
) -> Run:
    """Validate everything, then schedule a run on the running loop and return it at once.

    ``journal`` names a JSONL file that gets every row as soon as it finishes (fsynced), so a
    crashed kernel loses nothing. The default, ``"auto"``, writes a new file under ``./runs/``
    (or ``$SANDBOXNB_RUNS_DIR``); ``None`` turns journaling off. An existing journal is refused
    unless ``resume=True``, which keeps its rows and runs only the (task, repeat) pairs it does
    not hold yet; the journal's header must show the same run (taskset and its tasks, agent,
    runtime, config, repeats), and ``resume="force"`` continues it even if not.
    ``progress=True`` shows a text progress bar.
    """
    plan = make_plan(
        taskset,
        agent,
        runtime,
        config=config,
        max_concurrent=max_concurrent,
        repeats=repeats,
        timeout_s=timeout_s,
        journal=journal,
        resume=resume,
    )
    run_obj = Run(plan).start()
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
) -> Run:
    """Run every task ``repeats`` times, each rollout in a fresh sandbox; return the :class:`Run`.

    A failing rollout becomes a row with its error and the run goes on. If this coroutine is
    cancelled, the run is cancelled and every sandbox is released before it returns.
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
    )
    try:
        return await run_obj
    except asyncio.CancelledError:
        run_obj.cancel()
        await run_obj.wait()
        raise
