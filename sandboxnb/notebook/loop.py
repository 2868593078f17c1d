"""The bridge between synchronous notebook code (magics, widget callbacks) and asyncio.

Two loops matter in a kernel:

* the **kernel loop**: the asyncio loop the kernel runs cells on (top-level ``await``,
  ``sandboxnb.start(...)`` runs). Work for it is handed over with :func:`submit` /
  :func:`call_soon`, which are safe from any thread (ipywidgets callbacks may run on a
  subshell thread under JupyterLab >= 4.4).
* the **sandbox loop**: a dedicated loop on a daemon thread that owns the interactive sandboxes
  started by ``%sandbox`` and the launcher widget. A magic is synchronous and runs *inside* the
  kernel loop, so it cannot run that loop to completion without patching it for re-entrancy;
  running the work on the sandbox loop and waiting in the magic gives blocking cell semantics
  with no patching at all, keeps ``KeyboardInterrupt`` (Kernel > Interrupt) on the main thread
  where :func:`run_blocking` turns it into a clean cancellation, and lets widget callbacks launch
  or stop sandboxes while a cell is busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "Job",
    "LoopThread",
    "call_soon",
    "kernel_loop",
    "remember_kernel_loop",
    "run_blocking",
    "sandbox_loop",
    "shutdown_sandbox_loop",
    "submit",
]

T = TypeVar("T")

_kernel_loop: asyncio.AbstractEventLoop | None = None
_sandbox_loop: LoopThread | None = None
_lock = threading.Lock()


def remember_kernel_loop() -> asyncio.AbstractEventLoop | None:
    """Record the loop running in this thread (called from magics and at extension load)."""
    global _kernel_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return _kernel_loop
    _kernel_loop = loop
    return loop


def kernel_loop() -> asyncio.AbstractEventLoop:
    """The kernel's asyncio loop: the one running in this thread, else the one last recorded,
    else IPython's own persistent loop (terminal IPython and plain shells)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    if _kernel_loop is not None and not _kernel_loop.is_closed():
        return _kernel_loop
    from IPython.core.async_helpers import get_asyncio_loop

    return get_asyncio_loop()


class Job(concurrent.futures.Future):
    """A coroutine running as a task on some loop, observable and cancellable from any thread.

    Unlike the future of :func:`asyncio.run_coroutine_threadsafe`, :meth:`cancel_and_wait`
    waits until the task has actually finished unwinding (its teardown ran).
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._finished = threading.Event()
        loop.call_soon_threadsafe(self._start, coro)

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
        """Ask the task to cancel (thread-safe); returns at once. See :meth:`cancel_and_wait`."""
        if self._finished.is_set():
            return False
        self._cancel_requested = True
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._cancel_task)
        return True

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def cancel_and_wait(self, timeout: float | None = 30.0) -> bool:
        """Cancel and block until the task finished its teardown; False on timeout."""
        self.cancel()
        return self._finished.wait(timeout)

    def finished(self) -> bool:
        """True once the task is done (completed, failed or cancelled)."""
        return self._finished.is_set()


class LoopThread:
    """An asyncio loop running forever on a daemon thread."""

    def __init__(self, name: str = "sandboxnb-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> Job:
        """Run ``coro`` on this loop; thread-safe."""
        return Job(coro, self.loop)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left, stop the loop, join the thread and close the loop."""
        if self.loop.is_closed():
            return

        async def _cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            with contextlib.suppress(Exception):
                self.submit(_cancel_rest()).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


def sandbox_loop() -> LoopThread:
    """The process-wide sandbox loop, started on first use."""
    global _sandbox_loop
    with _lock:
        if _sandbox_loop is None or _sandbox_loop.loop.is_closed():
            _sandbox_loop = LoopThread()
        return _sandbox_loop


def shutdown_sandbox_loop() -> None:
    """Stop the sandbox loop if it was started (extension unload)."""
    global _sandbox_loop
    with _lock:
        thread, _sandbox_loop = _sandbox_loop, None
    if thread is not None:
        thread.stop()


def submit(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None) -> Job:
    """Run ``coro`` as a task on ``loop`` (default: the kernel loop) from any thread."""
    return Job(coro, loop or kernel_loop())


def call_soon(fn: Callable[..., Any], *args: Any, loop: asyncio.AbstractEventLoop | None = None):
    """Call ``fn(*args)`` on ``loop`` (default: the kernel loop), from any thread."""
    loop = loop or kernel_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        return loop.call_soon(fn, *args)
    return loop.call_soon_threadsafe(fn, *args)


def run_blocking(
    coro: Coroutine[Any, Any, T],
    *,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 0.05,
    cancel_grace_s: float = 15.0,
) -> T:
    """Run ``coro`` on the sandbox loop and block this thread until it finishes.

    ``on_tick`` runs on the calling thread every ``tick_s`` while waiting and once at the end
    (magics use it to print streamed output into the running cell). ``KeyboardInterrupt``
    cancels the coroutine, waits up to ``cancel_grace_s`` for its teardown, then re-raises.
    """
    job = sandbox_loop().submit(coro)
    try:
        while not job.finished():
            job._finished.wait(tick_s)
            if on_tick is not None:
                on_tick()
    except KeyboardInterrupt:
        deadline = time.monotonic() + cancel_grace_s
        job.cancel()
        while not job.finished() and time.monotonic() < deadline:
            try:
                job._finished.wait(tick_s)
                if on_tick is not None:
                    on_tick()
            except KeyboardInterrupt:  # a second interrupt while unwinding: keep unwinding
                continue
        raise
    if on_tick is not None:
        on_tick()
    return job.result()
