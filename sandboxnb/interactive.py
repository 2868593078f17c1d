"""Interactive sandboxes: ``async with launch("local", cpu=1) as sb`` and ``attach(url, token)``.

A ``launch()`` that is entered and never exited (``sb = await launch("modal").__aenter__()`` in
a notebook cell, a cell interrupted at the wrong moment) is still released: every open launch is
remembered with the loop it was entered on, and interpreter exit (``atexit``; the notebook
extension also does it at the kernel's shutdown request) exits them all, concurrently and within
:data:`EXIT_GRACE_S`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sandboxnb.config import FLAT_FIELDS, RuntimeConfig, merge_config, overrides_from_flat
from sandboxnb.errors import ConfigError
from sandboxnb.providers import Provider, get_provider

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox

__all__ = ["EXIT_GRACE_S", "attach", "launch", "open_launches", "release_open_launches",
           "release_open_launches_async", "resolve_launch"]

log = logging.getLogger(__name__)

#: Seconds interpreter exit waits for the open launches' releases.
EXIT_GRACE_S = 10.0

_open: dict[_Launch, asyncio.AbstractEventLoop] = {}
_open_lock = threading.Lock()
_exit_hook_registered = False


def resolve_launch(
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | None = None,
    **options: Any,
) -> tuple[Provider, RuntimeConfig]:
    """Split ``options`` into config fields and provider options; validate both, start nothing."""
    flat = {k: v for k, v in options.items() if k in FLAT_FIELDS}
    provider_options = {k: v for k, v in options.items() if k not in FLAT_FIELDS}
    try:
        provider = get_provider(runtime, **provider_options)
    except TypeError as err:
        raise ConfigError(
            f"{runtime!r} does not accept option(s) {', '.join(provider_options)}: {err}; "
            f"runtime options are {', '.join(FLAT_FIELDS)}"
        ) from None
    # a keyword given explicitly as None means None (no limit), as everywhere else
    return provider, provider.check(merge_config(config, overrides_from_flat(flat)))


class _Launch:
    """The context manager :func:`launch` returns; exiting it twice is harmless."""

    def __init__(self, runtime: str | Provider, config: RuntimeConfig | None,
                 options: dict[str, Any]) -> None:
        self._runtime, self._config, self._options = runtime, config, options
        self._provider: Provider | None = None
        self._context: Any = None
        self.sandbox: Sandbox | None = None

    async def __aenter__(self) -> Sandbox:
        if self._context is not None or self.sandbox is not None:
            raise RuntimeError("this launch() was already entered; call launch() again")
        provider, effective = resolve_launch(self._runtime, config=self._config,
                                             **self._options)
        self._provider = provider
        context = provider.open(effective)
        try:
            sandbox = await context.__aenter__()
        except BaseException:
            await self._close_provider()
            raise
        self._context, self.sandbox = context, sandbox
        _remember(self, asyncio.get_running_loop())
        return sandbox

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool:
        context, self._context = self._context, None
        if context is None:  # never entered, or already released (at exit)
            return False
        with _open_lock:
            _open.pop(self, None)
        try:
            return bool(await context.__aexit__(exc_type, exc, tb))
        finally:
            await self._close_provider()

    async def _close_provider(self) -> None:
        if self._provider is not None and not isinstance(self._runtime, Provider):
            await self._provider.aclose()

    def __repr__(self) -> str:
        state = "open" if self._context is not None else "not open"
        return f"<launch {self._runtime!r} {state}>"


def launch(
    runtime: str | Provider = "local",
    *,
    config: RuntimeConfig | None = None,
    **options: Any,
) -> _Launch:
    """Start a fresh sandbox and yield a connected :class:`~sandboxnb.client.Sandbox`.

    ``options`` are runtime options (``image``, ``cpu``, ``memory_mb``, ``disk_mb``, ``gpu``,
    ``startup_timeout_s``, ``run_timeout_s``, ``idle_timeout_s``: see
    :data:`sandboxnb.config.FLAT_FIELDS`) or provider options. The sandbox is released when the
    block exits, however it exits, and at interpreter exit if the block never exits.
    """
    return _Launch(runtime, config, options)


def _remember(entered: _Launch, loop: asyncio.AbstractEventLoop) -> None:
    global _exit_hook_registered
    with _open_lock:
        _open[entered] = loop
        if not _exit_hook_registered:
            atexit.register(release_open_launches)
            _exit_hook_registered = True


def open_launches() -> list[Any]:
    """The sandboxes of launches entered and not exited yet."""
    with _open_lock:
        return [entered.sandbox for entered in _open]


async def _exit_all(launches: list[_Launch], grace_s: float) -> None:
    tasks = [asyncio.ensure_future(entered.__aexit__(None, None, None)) for entered in launches]
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("releasing a sandbox at exit failed: %r", task.exception())
    if pending:
        log.error("%d sandbox release(s) still running after %g s at exit; `sandboxnb gc` "
                  "finds what they leave", len(pending), grace_s)


async def release_open_launches_async(grace_s: float = EXIT_GRACE_S) -> int:
    """Exit every open launch entered on the running loop, concurrently, waiting up to
    ``grace_s`` (the kernel's shutdown request); returns how many there were."""
    loop = asyncio.get_running_loop()
    with _open_lock:
        mine = [entered for entered, on in _open.items() if on is loop]
    await _exit_all(mine, grace_s)
    return len(mine)


def release_open_launches(grace_s: float = EXIT_GRACE_S) -> int:
    """Exit every open launch on the loop it was entered on, waiting up to ``grace_s`` per
    loop (interpreter exit; synchronous). A loop running in another thread is handed the work;
    a stopped one is run here until done; a closed one already finalized its launches.
    Returns how many launches were released."""
    with _open_lock:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Launch]] = {}
        for entered, loop in _open.items():
            by_loop.setdefault(loop, []).append(entered)
    released = 0
    for loop, launches in by_loop.items():
        if loop.is_closed():
            with _open_lock:
                for entered in launches:
                    _open.pop(entered, None)
            continue
        released += len(launches)
        with contextlib.suppress(Exception):
            _run_on(loop, _exit_all(launches, grace_s), grace_s + 1)
    return released


def _run_on(loop: asyncio.AbstractEventLoop, coro: Any, within_s: float) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop.is_running() and running is not loop:
        asyncio.run_coroutine_threadsafe(coro, loop).result(within_s)
    elif not loop.is_running():
        loop.run_until_complete(coro)
    else:  # called from inside that loop's own callbacks: it cannot be waited for here
        coro.close()


@asynccontextmanager
async def attach(url: str, token: str) -> AsyncIterator[Sandbox]:
    """Connect to an already running sandbox server; the server is left running on exit."""
    from sandboxnb.client import connect

    sandbox = await connect(url, token=token)
    try:
        yield sandbox
    finally:
        await sandbox.close()
