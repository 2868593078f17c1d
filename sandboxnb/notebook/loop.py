"""The bridge between synchronous notebook code (magics, widget callbacks) and the kernel loop.

Every interactive sandbox, ``%%sandbox`` cell and ``%sandbox run`` is a task on the **kernel
loop**, the asyncio loop the kernel runs cells on. Top-level ``await sb.exec(...)``, background
runs (``sandboxnb.start``) and sandbox heartbeats share it and keep running between cells.

* From another thread (ipywidgets callbacks may run on a subshell thread under JupyterLab
  >= 4.4) work is handed over with :func:`submit` (``call_soon_threadsafe``); such callbacks
  never block.
* A magic is synchronous and runs *inside* the kernel loop. :func:`run_blocking` makes that loop
  re-entrant with ``nest_asyncio2``, applied lazily at the first blocking call (never at import),
  and runs it until the work is done. While it waits, SIGINT (Kernel > Interrupt) only cancels
  the work task: a ``KeyboardInterrupt`` raised in whatever callback happens to run at that
  moment would kill an unrelated task (a connection's reader, a heartbeat, a background run).
  ``KeyboardInterrupt`` is raised in the cell once the task has unwound.
* Outside a kernel (terminal IPython, an in-process ``InteractiveShell``) no loop runs between
  cells; the kernel loop is then IPython's own asyncio loop (the one top-level ``await`` uses),
  which :func:`run_blocking` drives with a plain ``run_until_complete``. Its tasks (heartbeats)
  only progress while a cell or a magic runs it.

Checked in a real kernel (ipykernel 7.4.0, tornado 6.6.1, nest-asyncio2 1.7.4, CPython 3.11):
output streamed into the blocking cell, interrupts during heavy output left the connection
usable, heartbeats and background runs kept going between cells, queued cells did not start
inside a blocking one, and callbacks from other threads ran on the kernel loop, idle or busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "Job",
    "forget_kernel_loop",
    "kernel_loop",
    "remember_kernel_loop",
    "run_blocking",
    "submit",
    "wait_finished",
]

T = TypeVar("T")

_kernel_loop: asyncio.AbstractEventLoop | None = None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def remember_kernel_loop(
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.AbstractEventLoop | None:
    """Record ``loop`` (default: the loop running in this thread) as the kernel loop.

    Called at extension load, by every magic and by widget constructors, all of which run on the
    kernel's main thread."""
    global _kernel_loop
    loop = loop or _running_loop()
    if loop is not None:
        _kernel_loop = loop
    return _kernel_loop


def forget_kernel_loop() -> None:
    """Drop the recorded kernel loop (tests that stand in a loop of their own)."""
    global _kernel_loop
    _kernel_loop = None


def kernel_loop() -> asyncio.AbstractEventLoop:
    """The kernel's asyncio loop: the recorded one while usable from here, else the loop running
    in this thread, else IPython's persistent loop (terminal IPython and plain shells)."""
    running = _running_loop()
    recorded = _kernel_loop
    if recorded is not None and not recorded.is_closed() and (
        running is None or running is recorded or recorded.is_running()
    ):
        return recorded
    if running is not None:
        return running
    from IPython.core.async_helpers import get_asyncio_loop

    return get_asyncio_loop()


class Job(concurrent.futures.Future):
    """A coroutine running as a task on some loop, observable and cancellable from any thread.

    Unlike the future of :func:`asyncio.run_coroutine_threadsafe`, it completes only once the
    task has actually finished (its teardown ran), also when cancelled.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._finished = threading.Event()
        try:
            loop.call_soon_threadsafe(self._start, coro)
        except RuntimeError:  # loop closed
            coro.close()
            raise

    def _start(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._task = self.loop.create_task(coro)
        if self._cancel_requested:
            self._task.cancel()
        self._task.add_done_callback(self._copy)

    def _copy(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            super().cancel()
            self.set_running_or_notify_cancel()
        elif task.exception() is not None:
            self.set_exception(task.exception())
        else:
            self.set_result(task.result())
        self._finished.set()

    def cancel(self) -> bool:
        """Ask the task to cancel (thread-safe); returns at once."""
        if self._finished.is_set():
            return False
        self._cancel_requested = True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._cancel_task)
        return True

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def finished(self) -> bool:
        """True once the task is done (completed, failed or cancelled)."""
        return self._finished.is_set()


async def wait_finished(job: Job, within_s: float | None = None) -> bool:
    """Wait until ``job`` finished, without cancelling it; False on timeout."""
    if job.finished():
        return True
    done, _ = await asyncio.wait([asyncio.wrap_future(job)], timeout=within_s)
    return bool(done)


def submit(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None) -> Job:
    """Run ``coro`` as a task on ``loop`` (default: the kernel loop), from any thread."""
    return Job(coro, loop or kernel_loop())


def run_blocking(
    coro: Coroutine[Any, Any, T],
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.05,
    cancel_grace_s: float = 15.0,
) -> T:
    """Run ``coro`` as a task on ``loop`` (default: the kernel loop) and block until it ends.

    On the loop's own thread the loop is driven here (made re-entrant first if it is already
    running); from another thread this waits for the task. ``on_tick`` runs on the calling
    thread every ``tick_s`` and once at the end (magics print streamed output and refresh
    progress with it). An interrupt cancels the task, waits up to ``cancel_grace_s`` for its
    teardown, then raises ``KeyboardInterrupt``.
    """
    loop = loop or kernel_loop()
    running = _running_loop()
    if running is loop:
        _make_reentrant(loop)
        return _drive(loop, coro, on_tick, tick_s, cancel_grace_s)
    if not loop.is_running():
        if running is not None:
            coro.close()
            raise RuntimeError(
                "the sandbox loop is not running and another loop runs in this thread; "
                "call this from the notebook's main thread or await the coroutine instead"
            )
        return _drive(loop, coro, on_tick, tick_s, cancel_grace_s)
    return _wait_other_thread(loop, coro, on_tick, tick_s, cancel_grace_s)


def _make_reentrant(loop: asyncio.AbstractEventLoop) -> None:
    """Let a synchronous call run ``loop`` to completion while the loop is already running."""
    if getattr(loop, "_nest_patched", False):
        return
    import nest_asyncio2

    nest_asyncio2.apply(loop)


def _drive(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    on_tick: Callable[[], None] | None,
    tick_s: float,
    grace_s: float,
) -> T:
    task = loop.create_task(coro)
    interrupted = False
    deadline: float | None = None

    def on_sigint(_signum: int, _frame: Any) -> None:
        nonlocal interrupted
        if not interrupted:  # a second interrupt while unwinding changes nothing
            interrupted = True
            loop.call_soon_threadsafe(task.cancel)

    restore = _swap_sigint(on_sigint)
    try:
        while not task.done():
            if interrupted and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                loop.run_until_complete(asyncio.wait([task], timeout=tick_s))
            except KeyboardInterrupt:  # no handler of ours (not the main thread)
                interrupted = True
                task.cancel()
            if on_tick is not None:
                on_tick()
    finally:
        restore()
    if interrupted:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the interrupt wins
        raise KeyboardInterrupt
    return task.result()


def _swap_sigint(handler: Callable[[int, Any], None]) -> Callable[[], None]:
    """Install ``handler`` for SIGINT if this is the main thread and SIGINT is not ignored;
    return a function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        return lambda: None
    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)


def _wait_other_thread(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, T],
    on_tick: Callable[[], None] | None,
    tick_s: float,
    grace_s: float,
) -> T:
    job = submit(coro, loop)
    try:
        while not job.finished():
            job._finished.wait(tick_s)
            if on_tick is not None:
                on_tick()
    except KeyboardInterrupt:
        deadline = time.monotonic() + grace_s
        job.cancel()
        while not job.finished() and time.monotonic() < deadline:
            try:
                job._finished.wait(tick_s)
                if on_tick is not None:
                    on_tick()
            except KeyboardInterrupt:
                continue
        raise
    if on_tick is not None:
        on_tick()
    return job.result()
