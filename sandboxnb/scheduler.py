"""The scheduler: many rollouts, each in a fresh sandbox, bounded concurrency, live rows.

``await run(...)`` waits for the whole run; ``start(...)`` returns the :class:`Run` at once with
its work scheduled on the running event loop (a notebook keeps executing cells meanwhile).
Everything is validated before the first sandbox starts. Cancelling a run (or an error in the
scheduler itself) releases every sandbox before the run reports that it ended.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxnb.agents import Agent, resolve_agent
from sandboxnb.config import ConfigError, RuntimeConfig, merge_config
from sandboxnb.providers import Provider, get_provider
from sandboxnb.results import Journal, read_journal, rows_to_frame
from sandboxnb.rollout import rollout
from sandboxnb.tasks import Task, Taskset

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Run", "active_runs", "load", "run", "start"]

log = logging.getLogger("sandboxnb.scheduler")
Listener = Callable[[dict[str, Any]], None]
_ACTIVE: set[Run] = set()


def active_runs() -> list[Run]:
    """Runs scheduled in this process that have not ended (for shutdown hooks and monitors)."""
    return list(_ACTIVE)


class Run:
    """A set of rollouts and their rows, live while it executes and loadable afterwards."""

    def __init__(
        self,
        plan: list[tuple[Task, int, RuntimeConfig]],
        agent: Agent | None,
        provider: Provider | None,
        *,
        max_concurrent: int = 8,
        timeout_s: float | None = None,
        journal: Journal | None = None,
        owns_provider: bool = False,
        rows: list[dict[str, Any]] | None = None,
        name: str = "run",
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.name = name
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.status = "pending" if plan else "done"
        self.total = len(plan) + len(self.rows)
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self.provider_name = provider.name if provider else None
        self.started_at: datetime | None = None
        self.wall_s: float | None = None
        self.error: BaseException | None = None
        self._plan = plan
        self._agent = agent
        self._provider = provider
        self._owns_provider = owns_provider
        self._journal = journal
        self.journal_path: Path | None = journal.path if journal else None
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Run:
        """Schedule the run on the running event loop and return at once."""
        if self._task is None and self.status == "pending":
            self._task = asyncio.get_running_loop().create_task(self._execute())
            _ACTIVE.add(self)
        return self

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> Run:
        self.start()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self.status == "failed" and self.error is not None:
            raise self.error
        return self

    def cancel(self) -> None:
        """Stop the run: in-flight rollouts are cancelled and their sandboxes released."""
        if self._task is not None and not self._task.done():
            self._task.get_loop().call_soon_threadsafe(self._task.cancel)
        elif self.status == "pending":
            self.status = "cancelled"

    @property
    def done(self) -> bool:
        return self.status in ("done", "cancelled", "failed")

    async def _execute(self) -> None:
        self.status = "running"
        self.started_at = datetime.now(UTC)
        began = time.perf_counter()
        queue: asyncio.Queue[tuple[Task, int, RuntimeConfig]] = asyncio.Queue()
        for item in self._plan:
            queue.put_nowait(item)
        workers = [
            asyncio.create_task(self._worker(queue))
            for _ in range(min(self.max_concurrent, len(self._plan)))
        ]
        try:
            await asyncio.gather(*workers)
            self.status = "done"
        except asyncio.CancelledError:
            self.status = "cancelled"
        except Exception as err:  # a bug in a listener or the scheduler itself
            self.status, self.error = "failed", err
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)  # every sandbox released
            self.wall_s = time.perf_counter() - began
            _ACTIVE.discard(self)
            if self._journal is not None:
                try:
                    await asyncio.to_thread(self._journal.close)
                except RuntimeError:  # interpreter shutting down: close in this thread
                    self._journal.close()
            if self._owns_provider and self._provider is not None:
                await self._provider.aclose()

    async def _worker(self, queue: asyncio.Queue[tuple[Task, int, RuntimeConfig]]) -> None:
        assert self._provider is not None and self._agent is not None
        while not queue.empty():
            task, repeat, config = queue.get_nowait()
            await rollout(
                self._provider,
                task,
                repeat,
                config,
                self._agent,
                run_id=self.id,
                timeout_s=self.timeout_s,
                on_done=self._record,
            )

    def _record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
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

    def counts(self) -> dict[str, int]:
        """Number of rows by status."""
        return dict(Counter(row["status"] for row in self.rows))

    def mean_reward(self) -> float:
        """Mean reward over graded rows (NaN if none)."""
        rewards = [r["reward"] for r in self.rows if _is_number(r.get("reward"))]
        return sum(rewards) / len(rewards) if rewards else math.nan

    def to_pandas(self) -> pd.DataFrame:
        """The rows so far as a tidy DataFrame (see :func:`sandboxnb.results.rows_to_frame`)."""
        return rows_to_frame(list(self.rows))

    def summary(self) -> str:
        """One line: rows by status, mean reward and wall time."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())) or "no rows"
        wall = f"{self.wall_s:.1f}s" if self.wall_s is not None else "-"
        return (
            f"{len(self.rows)}/{self.total} rollouts ({counts}); "
            f"mean reward {self.mean_reward():.3f}; wall {wall}; status {self.status}"
        )

    def __repr__(self) -> str:
        return f"<Run {self.name} {self.id}: {self.summary()}>"

    def _repr_html_(self) -> str:
        from html import escape

        return f"<b>sandboxnb run</b> <code>{escape(self.name)}</code>: {escape(self.summary())}"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """In a Jupyter kernel with ipywidgets, a run displays as its live monitor; elsewhere
        as the one-line summary. Never blocks."""
        bundle = {"text/plain": repr(self), "text/html": self._repr_html_()}
        if _in_kernel():
            try:
                from sandboxnb.notebook import monitor

                bundle = monitor(self)._repr_mimebundle_() | bundle
            except ImportError:  # the notebook extra is not installed
                pass
        return bundle


def _in_kernel() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return getattr(shell, "kernel", None) is not None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def _plan(
    taskset: Taskset,
    provider: Provider,
    base: RuntimeConfig,
    repeats: int,
    skip: set[tuple[str, int]],
) -> list[tuple[Task, int, RuntimeConfig]]:
    plan = []
    for task in taskset:
        try:
            config = provider.check(task.effective_config(base))
        except ConfigError as err:
            if task.runtime:  # name the task whose overrides made the config invalid
                err.args = (f"task {task.id!r}: {err}",)
            raise
        for repeat in range(repeats):
            if (task.id, repeat) not in skip:
                plan.append((task, repeat, config))
    return plan


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r}: expected an integer >= 1")
    return value


def start(
    taskset: str | Path | Taskset | Iterable[Task | Mapping[str, Any]],
    agent: str | Agent,
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | Mapping[str, Any] | None = None,
    max_concurrent: int = 8,
    repeats: int = 1,
    timeout_s: float | None = None,
    journal: str | Path | None = "auto",
    resume: bool = False,
    progress: bool = False,
) -> Run:
    """Validate everything, then schedule a run on the running loop and return it at once.

    ``journal`` names a JSONL file that gets every row as soon as it finishes (fsynced), so a
    crashed kernel loses nothing. The default, ``"auto"``, writes a new file under ``./runs/``
    (or ``$SANDBOXNB_RUNS_DIR``); ``None`` turns journaling off. An existing journal is refused
    unless ``resume=True``, which keeps its rows and runs only the (task, repeat) pairs it does
    not hold yet.
    """
    run_obj = _prepare(
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
    run_obj.start()
    if progress:
        _attach_progress(run_obj)
    return run_obj


async def run(
    taskset: str | Path | Taskset | Iterable[Task | Mapping[str, Any]],
    agent: str | Agent,
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | Mapping[str, Any] | None = None,
    max_concurrent: int = 8,
    repeats: int = 1,
    timeout_s: float | None = None,
    journal: str | Path | None = "auto",
    resume: bool = False,
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
        if run_obj._task is not None:
            await asyncio.gather(run_obj._task, return_exceptions=True)
        raise


def _prepare(
    taskset, agent, runtime, *, config, max_concurrent, repeats, timeout_s, journal, resume
) -> Run:
    max_concurrent = _positive_int("max_concurrent", max_concurrent)
    repeats = _positive_int("repeats", repeats)
    if timeout_s is not None and (not _is_number(timeout_s) or timeout_s <= 0):
        raise ValueError(f"timeout_s = {timeout_s!r}: expected a number of seconds > 0 or None")
    tasks = Taskset.load(taskset)
    agent_fn = resolve_agent(agent)
    base = merge_config(RuntimeConfig(), config)
    provider = get_provider(runtime)
    previous: list[dict[str, Any]] = []
    journal_obj = None
    if journal == "auto":
        journal = _auto_journal_path(tasks.name)
    if journal is not None:
        path = Path(journal)
        if path.exists() and path.stat().st_size > 0:
            if not resume:
                raise FileExistsError(
                    f"journal = {str(path)!r} already holds results; pass resume=True "
                    "(CLI: --resume) to continue it, or choose a new path"
                )
            previous = [r for r in read_journal(path) if r.get("status") != "cancelled"]
    done = {(r["task_id"], int(r["repeat"])) for r in previous}
    plan = _plan(tasks, provider, base, repeats, done)
    if journal is not None:
        journal_obj = Journal(journal)
    return Run(
        plan,
        agent_fn,
        provider,
        max_concurrent=max_concurrent,
        timeout_s=timeout_s,
        journal=journal_obj,
        owns_provider=not isinstance(runtime, Provider),
        rows=previous,
        name=tasks.name,
    )


def _auto_journal_path(name: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    directory = Path(os.environ.get("SANDBOXNB_RUNS_DIR", "runs"))
    return directory / f"{safe}-{stamp}-{uuid.uuid4().hex[:6]}.jsonl"


def _attach_progress(run_obj: Run) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=run_obj.total, initial=len(run_obj.rows), desc=run_obj.name, unit="rollout")

    def update(row: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(
            run_obj.counts() | {"reward": f"{run_obj.mean_reward():.3f}"}, refresh=False
        )

    run_obj.subscribe(update)
    if run_obj._task is not None:  # closed however the run ends (done, cancelled, failed)
        run_obj._task.add_done_callback(lambda _: bar.close())
    else:
        bar.close()


def load(journal: str | Path) -> Run:
    """Read a journal back into a finished :class:`Run` (a torn last line is skipped)."""
    rows = read_journal(journal)
    loaded = Run([], None, None, rows=rows, name=Path(journal).stem)
    if rows:
        loaded.id = str(rows[0].get("run_id") or loaded.id)
        loaded.provider_name = rows[0].get("provider")
    return loaded
