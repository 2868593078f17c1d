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
* While it blocks, widget clicks still arrive: ipykernel >= 7 handles each message of the main
  shell in one shared ``contextvars.Context``, the one the blocking cell runs in, and a nested
  loop cannot enter a Context that is already entered (``nest_asyncio2`` defers such handles
  until the nested run ends, which held a Cancel click back until the cell finished).
  :func:`run_blocking` therefore takes the comm messages (``comm_msg``, ``comm_open``,
  ``comm_close``) of the main shell itself and dispatches them in a fresh Context, the way
  ipykernel dispatches them during an ``await``-ing cell; every other message (queued cells)
  keeps its order and waits for the cell. ipykernel routes a click to the main shell whenever
  the widget last published from it, subshells or not.
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
import contextvars
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "Interrupted",
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


class Interrupted(KeyboardInterrupt):
    """Kernel > Interrupt ended a magic's work cleanly: IPython shows the one-line ``message``
    instead of a traceback through the library. Still a ``KeyboardInterrupt`` (and reported
    under that name, the ``ename`` front ends look for), so "Run All" stops here."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[33m{self.message}\x1b[0m"]


Interrupted.__name__ = "KeyboardInterrupt"


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
    stop_pumping = _dispatch_comms_meanwhile(loop)

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
        stop_pumping()
    if interrupted:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the interrupt wins
        raise KeyboardInterrupt
    return task.result()


_COMM_TYPES = frozenset({"comm_msg", "comm_open", "comm_close"})


def _dispatch_comms_meanwhile(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """While a magic blocks the kernel's main shell, dispatch the comm messages it receives at
    once (see the module docstring); return a function that restores the kernel's own handling.
    Outside an ipykernel kernel (or one laid out differently) this does nothing."""
    kernel = _kernel()
    stream = _main_shell_stream(kernel)
    original = getattr(stream, "_recv_callback", None)
    if kernel is None or stream is None or original is None or \
            not callable(getattr(kernel, "shell_main", None)):
        return lambda: None
    copy = getattr(stream, "_recv_copy", False)

    def on_recv(msg: list[Any]) -> Any:
        if _msg_type(kernel, msg, copy) in _COMM_TYPES:
            # a fresh Context: the kernel's shared one is entered by the blocking cell
            return loop.create_task(kernel.shell_main(None, msg),
                                    context=contextvars.Context())
        return original(msg)

    stream.on_recv(on_recv, copy=copy)
    return lambda: stream.on_recv(original, copy=copy)


def _kernel() -> Any:
    """The running ipykernel kernel, or None (terminal IPython, a plain shell)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - the notebook layer needs IPython
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None) if shell is not None else None


def _main_shell_stream(kernel: Any) -> Any:
    """The ZMQ stream on which the kernel's main thread receives its shell messages: from the
    shell channel thread when the kernel has subshells (ipykernel >= 7), else the shell socket's."""
    if kernel is None or threading.current_thread() is not threading.main_thread():
        return None
    thread = getattr(kernel, "shell_channel_thread", None)
    if thread is not None:
        pair = getattr(getattr(thread, "manager", None), "_shell_channel_to_main", None)
        return getattr(pair, "to_stream", None)
    return getattr(kernel, "shell_stream", None)


def _msg_type(kernel: Any, msg: list[Any], copy: bool) -> str | None:
    """The type of a raw shell message (only its header is decoded)."""
    try:
        _, frames = kernel.session.feed_identities(msg, copy=copy)
        return kernel.session.deserialize(frames, content=False, copy=copy)["header"]["msg_type"]
    except Exception:  # malformed: leave it to the kernel, which logs it
        return None


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
