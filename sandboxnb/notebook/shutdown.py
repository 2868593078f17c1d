"""Releasing everything when the kernel goes away: background runs (``sandboxnb.start``) are
cancelled and interactive sandboxes stopped, so no sandbox outlives its kernel.

Two hooks, both installed by ``%load_ext sandboxnb``:

* the kernel's shutdown request (``Kernel.do_shutdown``, also on restart): runs while the kernel
  loop and the interpreter are still fully alive, so rollouts unwind normally and their
  cancelled rows still reach the run's journal (its writer thread still accepts work);
* ``atexit``, the fallback (terminal IPython, a kernel ending without a shutdown request). By
  then the loop has stopped and thread pools refuse new work; the loop is run once more here
  until the teardowns finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
from typing import Any

__all__ = ["at_exit", "hook_kernel_shutdown", "release_everything", "unhook_kernel_shutdown"]

#: seconds the shutdown hooks wait for runs and sandboxes to unwind
GRACE_S = 10.0

_hooked: dict[int, tuple[Any, Any]] = {}


def _active_runs() -> list[Any]:
    scheduler = sys.modules.get("sandboxnb.scheduler")
    return scheduler.active_runs() if scheduler is not None else []


async def release_everything(grace_s: float = GRACE_S) -> None:
    """On the kernel loop: cancel every background run that has not ended, ask every
    interactive sandbox to stop, and wait (up to ``grace_s``) until all of them unwound."""
    from sandboxnb.notebook import state

    waits: list[asyncio.Future[Any]] = []
    for run in _active_runs():
        run.cancel()
        task = getattr(run, "_task", None)
        if task is not None and not task.done():
            waits.append(task)
    current = state._manager
    if current is not None:
        for record in current.records():
            current._request_stop(record)
            if record.job is not None and not record.job.finished():
                waits.append(asyncio.wrap_future(record.job))
    if waits:
        await asyncio.wait(waits, timeout=grace_s)


def _cancel_runs_blocking(grace_s: float = GRACE_S) -> None:
    """Cancel background runs from synchronous code and wait for them (atexit)."""
    from sandboxnb.notebook.loop import run_blocking

    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Task[Any]]] = {}
    for run in _active_runs():
        run.cancel()
        task = getattr(run, "_task", None)
        if task is not None and not task.done():
            by_loop.setdefault(task.get_loop(), []).append(task)
    for loop, tasks in by_loop.items():
        if not loop.is_closed():
            run_blocking(asyncio.wait(tasks, timeout=grace_s), loop=loop)


def at_exit() -> None:
    """Interpreter exit: cancel background runs, then stop interactive sandboxes."""
    from sandboxnb.notebook import _release_all

    for step in (_cancel_runs_blocking, _release_all):
        with contextlib.suppress(Exception):
            step()


def hook_kernel_shutdown(ip: Any) -> None:
    """Make the kernel of shell ``ip`` (if any) release everything before it shuts down."""
    kernel = getattr(ip, "kernel", None)
    original = getattr(kernel, "do_shutdown", None)
    if original is None or id(ip) in _hooked:
        return
    from sandboxnb.notebook.loop import kernel_loop

    loop = kernel_loop()

    async def do_shutdown(restart: bool) -> Any:
        with contextlib.suppress(Exception):
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                await release_everything()
            elif loop.is_running():  # the request is served on the control thread
                future = asyncio.run_coroutine_threadsafe(release_everything(), loop)
                await asyncio.wait([asyncio.wrap_future(future)], timeout=GRACE_S + 1)
        result = original(restart)
        return await result if inspect.isawaitable(result) else result

    kernel.do_shutdown = do_shutdown
    _hooked[id(ip)] = (kernel, original)


def unhook_kernel_shutdown(ip: Any) -> None:
    """Undo :func:`hook_kernel_shutdown` (extension unload)."""
    kernel, _original = _hooked.pop(id(ip), (None, None))
    if kernel is not None:
        with contextlib.suppress(AttributeError):
            del kernel.do_shutdown  # the instance attribute; the class method shows again
