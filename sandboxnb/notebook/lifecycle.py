"""The extension's lifecycle: load, unload, kernel shutdown, interpreter exit.

Loading registers the magics, the rich displays and the release hooks, and nothing else.
Unloading, the kernel's shutdown and interpreter exit release everything: background runs
(``sandboxnb.start``) are cancelled, interactive sandboxes stopped and ``sandboxnb.launch()``
contexts that were entered and never exited released, so no sandbox outlives its kernel. Two
release hooks:

* the kernel's shutdown request (``Kernel.do_shutdown``, also on restart): runs while the kernel
  loop and the interpreter are still fully alive, so rollouts unwind normally and their
  cancelled rows still reach the run's journal (its writer thread still accepts work);
* ``atexit``, the fallback (terminal IPython, a kernel ending without a shutdown request). By
  then the loop has stopped and thread pools refuse new work; the loop is run once more here
  until the teardowns finished.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import sys
from typing import Any

__all__ = [
    "at_exit",
    "hook_kernel_shutdown",
    "load",
    "release_everything",
    "unhook_kernel_shutdown",
    "unload",
]

#: seconds the shutdown hooks wait for runs and sandboxes to unwind
GRACE_S = 10.0

_loaded: dict[int, Any] = {}
_hooked: dict[int, tuple[Any, Any]] = {}
_atexit_registered = False


def load(ip: Any) -> None:
    """``%load_ext sandboxnb``: register ``%sandbox`` / ``%%sandbox``, the settings
    ``SandboxMagics``, the rich displays and the release hooks on shell ``ip``."""
    global _atexit_registered
    from sandboxnb.notebook import display
    from sandboxnb.notebook.loop import remember_kernel_loop
    from sandboxnb.notebook.magics import SandboxMagics

    if id(ip) in _loaded:
        return
    remember_kernel_loop()
    magics = SandboxMagics(shell=ip, parent=ip)
    ip.register_magics(magics)
    if magics not in ip.configurables:
        ip.configurables.append(magics)
    _loaded[id(ip)] = magics
    display.register(ip)
    hook_kernel_shutdown(ip)
    if not _atexit_registered:
        atexit.register(at_exit)
        _atexit_registered = True


def unload(ip: Any) -> None:
    """``%unload_ext sandboxnb``: stop every sandbox launched from this session and unregister
    what :func:`load` registered."""
    from sandboxnb.notebook import display
    from sandboxnb.notebook.handle import SandboxHandle
    from sandboxnb.notebook.sandboxes import release_all

    magics = _loaded.pop(id(ip), None)
    unhook_kernel_shutdown(ip)
    release_all()
    if magics is None:
        return
    display.unregister(ip)
    for name, value in list(ip.user_ns.items()):
        if isinstance(value, SandboxHandle):
            del ip.user_ns[name]
    table = ip.magics_manager.magics
    for kind in ("line", "cell"):
        table[kind].pop("sandbox", None)
    ip.magics_manager.registry.pop(type(magics).__name__, None)
    if magics in ip.configurables:
        ip.configurables.remove(magics)


def _active_runs() -> list[Any]:
    scheduler = sys.modules.get("sandboxnb.scheduler")  # never used: nothing to cancel
    return scheduler.active_runs() if scheduler is not None else []


async def release_everything(grace_s: float = GRACE_S) -> None:
    """On the kernel loop: cancel every background run that has not ended, ask every
    interactive sandbox to stop, exit every open ``launch()``, and wait (up to ``grace_s``)
    until all of them unwound."""
    from sandboxnb.interactive import release_open_launches_async
    from sandboxnb.notebook.sandboxes import current_manager

    runs = _active_runs()
    for run in runs:
        run.cancel()
    waits = [asyncio.ensure_future(run.wait()) for run in runs if not run.done()]
    manager = current_manager()
    if manager is not None:
        waits.append(asyncio.ensure_future(manager.stop_all_async(grace_s)))
    waits.append(asyncio.ensure_future(release_open_launches_async(grace_s)))
    if waits:
        _done, pending = await asyncio.wait(waits, timeout=grace_s)
        for waiter in pending:  # only the waiting stops; the teardowns go on
            waiter.cancel()


def _cancel_runs_blocking(grace_s: float = GRACE_S) -> None:
    """Cancel background runs from synchronous code and wait for them (atexit): each run's
    loop is driven until its run ended."""
    from sandboxnb.notebook.loop import run_blocking

    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for run in _active_runs():
        run.cancel()
        if not run.done() and run.loop is not None:
            by_loop.setdefault(run.loop, []).append(run)
    for loop, runs in by_loop.items():
        if not loop.is_closed():
            run_blocking(_wait_runs(runs, grace_s), loop=loop)


async def _wait_runs(runs: list[Any], grace_s: float) -> None:
    waits = [asyncio.ensure_future(run.wait()) for run in runs]
    _done, pending = await asyncio.wait(waits, timeout=grace_s)
    for waiter in pending:
        waiter.cancel()


def at_exit() -> None:
    """Interpreter exit: cancel background runs, stop interactive sandboxes, then exit the
    ``launch()`` contexts still open."""
    from sandboxnb.interactive import release_open_launches
    from sandboxnb.notebook.sandboxes import release_all

    for step in (_cancel_runs_blocking, release_all, release_open_launches):
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
