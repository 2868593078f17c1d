"""A warm pool: ``size`` fresh, connected sandboxes kept ready for one config.

Every rollout still gets a fresh sandbox: a spare is handed out once and never comes back; when
its rollout ends it is released as any sandbox is, in the background (the pool tracks that
release, and :meth:`Pool.drain` and :meth:`Pool.aclose` wait for it, so a run that used the pool
ends only once its sandboxes are gone). Each hand-out starts a refill; at most ``max_filling``
sandboxes are being created at once (a hand-out that leaves the pool above its low-water mark
refills once that sandbox is given back), and a failed create is reported (log, :meth:`Pool.stats`)
and retried after a backoff that doubles up to ``BACKOFF_CAP_S`` (never a busy loop).

Spares are owned by the pool: :meth:`Pool.aclose` (``async with Pool(...)``, a run's end for the
pool it made, interpreter exit for a pool left open) releases them and any create in flight.
A spare runs ``true`` once before it is ready (``warm=True``; see :class:`Pool`). Its
``limits.run_timeout_s`` clock starts when it is handed out, not while it waits.

A rollout whose config differs from the pool's (a task that overrides it) acquires as usual.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from sandboxnb.config import RuntimeConfig, merge_config
from sandboxnb.errors import ConfigError

if TYPE_CHECKING:
    from sandboxnb.client import Sandbox
    from sandboxnb.providers.base import Provider, _Acquired

__all__ = ["MAX_SIZE", "Pool", "open_pools", "parse_pool_size"]

log = logging.getLogger("sandboxnb.pool")

MAX_SIZE = 1000
#: Concurrent creates when ``max_filling`` is not given: ``min(size, DEFAULT_MAX_FILLING)``.
DEFAULT_MAX_FILLING = 4
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
#: What a spare runs once before it counts as ready (``warm=True``): it loads the server's
#: process machinery, which a fresh server imports only at its first exec.
WARM_COMMAND = ("true",)

_open: set[Pool] = set()
_open_lock = threading.Lock()
_exit_hook = False


def parse_pool_size(value: Any, name: str = "pool") -> int:
    """An int from 1 to :data:`MAX_SIZE`, else :class:`ConfigError` naming ``name`` and value."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ConfigError(f"{name} = {value!r}: expected an integer from 1 to {MAX_SIZE} "
                          "(sandboxes kept ready)")
    return value


def open_pools() -> list[Pool]:
    """Pools started in this process and not closed yet."""
    with _open_lock:
        return list(_open)


class _Spare:
    """A ready sandbox: what its acquisition reached, and its connected client."""

    __slots__ = ("client", "state")

    def __init__(self, state: _Acquired, client: Sandbox) -> None:
        self.state = state
        self.client = client


class Pool:
    """``size`` ready sandboxes of ``provider`` for ``config``, each handed out once.

    ``provider`` is a provider or its name (a pool made from a name owns, and closes, it).
    ``max_filling``: creates at once (default ``min(size, 4)``). A hand-out refills at once
    when fewer than ``low_water`` spares (default half the size, rounded up) are ready or
    coming; otherwise the refill starts when the sandbox handed out is given back, so creates
    do not compete for the CPU with short rollouts. ``warm``: each spare runs
    ``true`` once before it counts as ready, so its first exec does not pay the server's lazy
    imports (no files change; no task or agent ever ran in it).
    Use ``async with Pool(...) as pool`` or ``await pool.start()`` ... ``await pool.aclose()``;
    pass it as ``sandboxnb.run(..., pool=pool)`` to share it across runs.
    """

    def __init__(self, provider: str | Provider = "local", size: int = 4, *,
                 config: RuntimeConfig | Mapping[str, Any] | None = None,
                 max_filling: int | None = None, low_water: int | None = None,
                 warm: bool = True) -> None:
        from sandboxnb.providers import Provider, get_provider

        self.size = parse_pool_size(size, "size")
        if max_filling is not None:
            max_filling = parse_pool_size(max_filling, "max_filling")
        self.max_filling = max_filling or min(self.size, DEFAULT_MAX_FILLING)
        if low_water is not None and (isinstance(low_water, bool) or not isinstance(
                low_water, int) or not 1 <= low_water <= self.size):
            raise ConfigError(f"low_water = {low_water!r}: expected an integer from 1 to the "
                              f"pool's size ({self.size})")
        self.low_water = low_water or (self.size + 1) // 2
        if not isinstance(warm, bool):
            raise ConfigError(f"warm = {warm!r}: expected True or False")
        self.warm = warm
        self._owns_provider = not isinstance(provider, Provider)
        self.provider: Provider = get_provider(provider)
        self.config: RuntimeConfig = self.provider.check(merge_config(RuntimeConfig(), config))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: collections.deque[_Spare] = collections.deque()
        self._fills: set[asyncio.Task[None]] = set()
        self._waiters: collections.deque[asyncio.Future[_Spare | None]] = collections.deque()
        self._releases: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._backoff: asyncio.TimerHandle | None = None
        self._backoff_until = 0.0
        self._closed = False
        self.handed_out = 0
        self.created = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.release_failures = 0
        self.last_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> Pool:
        """Begin filling (on the running loop; idempotent)."""
        self._bind()
        return self

    async def __aenter__(self) -> Pool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _bind(self) -> None:
        global _exit_hook
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; make a new Pool")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._changed = asyncio.Event()
            with _open_lock:
                _open.add(self)
                if not _exit_hook:
                    atexit.register(_close_open_pools)
                    _exit_hook = True
            self._top_up()
        elif self._loop is not loop:
            raise RuntimeError(f"{self!r} fills on another event loop; use it from that loop")

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Stop refilling, release every spare and create in flight, wait for every release
        (also of sandboxes handed out), then close the provider if the pool made it."""
        if self._loop is None:  # never started: nothing to release
            self._closed = True
            if self._owns_provider:
                await self.provider.aclose()
            return
        if not self._closed:
            self._closed = True
            if self._backoff is not None:
                self._backoff.cancel()
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            for fill in list(self._fills):
                fill.cancel()
            while self._ready:
                self._retire(self._ready.popleft())
        cancelled = False
        pending = [*self._fills, *self._releases]
        while pending:  # a cancellation here must not cut the releases short
            try:
                await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
            except asyncio.CancelledError:
                cancelled = True
            pending = [task for task in (*self._fills, *self._releases) if not task.done()]
        with _open_lock:
            _open.discard(self)
        if self._owns_provider:
            await self.provider.aclose()
        self._pulse()
        if cancelled:
            raise asyncio.CancelledError

    async def _abandon(self) -> None:
        """Destroy the spares of a pool whose loop is gone (interpreter exit)."""
        self._closed = True
        spares, self._ready = list(self._ready), collections.deque()
        await asyncio.gather(*(_destroy(self.provider, spare.state) for spare in spares),
                             return_exceptions=True)
        with _open_lock:
            _open.discard(self)

    async def drain(self) -> None:
        """Wait until the sandboxes handed out so far (and retired) are released."""
        cancelled = False
        while pending := [task for task in self._releases if not task.done()]:
            try:
                await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    async def wait_full(self) -> None:
        """Wait until ``size`` spares are ready (for benchmarks and tests; may wait forever if
        creates keep failing: bound it with ``asyncio.timeout``)."""
        self._bind()
        assert self._changed is not None
        while len(self._ready) < self.size:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._changed.clear()
            await self._changed.wait()

    # -- hand-out ---------------------------------------------------------------------------
    def serves(self, config: RuntimeConfig) -> bool:
        """Whether a rollout with ``config`` (as checked by the provider) takes a spare."""
        return config == self.config

    def open(self, config: RuntimeConfig | None = None) -> AbstractAsyncContextManager[Sandbox]:
        """A fresh connected sandbox for ``config``: a spare when it is the pool's config (the
        next one being created if none is ready), else one acquired as usual."""
        if config is not None and not self.serves(config):
            return self.provider.open(config)
        return self._handout()

    @contextlib.asynccontextmanager
    async def _handout(self) -> AsyncIterator[Sandbox]:
        spare = await self._take()
        if spare is None:  # none ready nor coming: acquire as usual
            async with self.provider.open(self.config) as sandbox:
                yield sandbox
            return
        state = spare.state
        run_timeout = state.spec.config.limits.run_timeout_s
        if run_timeout is not None:
            state.timer = asyncio.get_running_loop().call_later(
                run_timeout, self.provider._expire, state, run_timeout)
        try:
            yield spare.client
        finally:
            self._retire(spare)  # synchronous: a cancellation cannot skip it
            self._top_up()

    async def _take(self) -> _Spare | None:
        self._bind()
        while True:
            while self._ready:
                spare = self._ready.popleft()
                if spare.client.closed:  # its server went away while it waited
                    self._retire(spare)
                    self._top_up()
                    continue
                self._handed(spare)
                return spare
            if self._closed or len(self._waiters) >= len(self._fills):
                return None
            waiter: asyncio.Future[_Spare | None] = self._loop.create_future()  # type: ignore[union-attr]
            self._waiters.append(waiter)
            try:
                spare = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    unused = waiter.result()  # given to us as we were cancelled: not ours
                    if self._closed:
                        self._retire(unused)
                    else:
                        self._ready.appendleft(unused)
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                raise
            if spare is None:
                return None
            if spare.client.closed:
                self._retire(spare)
                self._top_up()
                continue
            self._handed(spare)
            return spare

    def _handed(self, spare: _Spare) -> None:
        self.handed_out += 1
        spare.state.endpoint.meta["pool"] = True  # type: ignore[union-attr]
        if len(self._ready) + len(self._fills) - len(self._waiters) < self.low_water:
            self._top_up()
        self._pulse()

    def _retire(self, spare: _Spare) -> None:
        """Release ``spare`` in the background; the pool tracks it until it is gone."""
        if spare.state.timer is not None:
            spare.state.timer.cancel()
        task = asyncio.ensure_future(self._release(spare))
        self._releases.add(task)
        task.add_done_callback(self._released)

    async def _release(self, spare: _Spare) -> None:
        with contextlib.suppress(Exception):
            await spare.client.close()
        await self.provider._start_release(spare.state)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releases.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.release_failures += 1
            log.error("pool: releasing a sandbox of %s failed: %r", self.provider.name,
                      task.exception())
        self._pulse()

    # -- refill -----------------------------------------------------------------------------
    def _top_up(self) -> None:
        if self._closed or self._loop is None or self._backoff_until > time.monotonic():
            return
        while (len(self._ready) + len(self._fills) - len(self._waiters) < self.size
               and len(self._fills) < self.max_filling):
            fill = self._loop.create_task(self._fill())
            self._fills.add(fill)
        self._pulse()

    async def _fill(self) -> None:
        from sandboxnb.providers.base import _Acquired

        provider = self.provider
        state = _Acquired(provider.launch_spec(self.config))
        client: Sandbox | None = None
        try:
            client = await provider._acquire(state)
            if self.warm:
                warmed = await client.exec(list(WARM_COMMAND), timeout=30)
                if warmed.exit_code != 0:
                    raise RuntimeError(f"the warm-up {list(WARM_COMMAND)} exited "
                                       f"{warmed.exit_code}: {warmed.stderr.strip()[-200:]}")
        except asyncio.CancelledError:
            await provider._end(state, client, raise_errors=False)
            self._fills.discard(asyncio.current_task())  # type: ignore[arg-type]
            raise
        except Exception as err:
            await provider._end(state, client, raise_errors=False)
            self._fills.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._failed(err)
            return
        assert client is not None
        self._fills.discard(asyncio.current_task())  # type: ignore[arg-type]
        self.created += 1
        self.consecutive_failures = 0
        spare = _Spare(state, client)
        if self._closed:
            self._retire(spare)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(spare)
                self._top_up()
                return
        self._ready.append(spare)
        self._top_up()

    def _failed(self, err: BaseException) -> None:
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = f"{type(err).__name__}: {err}"
        delay = min(BACKOFF_START_S * 2 ** (self.consecutive_failures - 1), BACKOFF_CAP_S)
        log.warning("pool: creating a %s sandbox failed (%d in a row): %s; retrying in %.1fs",
                    self.provider.name, self.consecutive_failures, self.last_error, delay)
        while self._waiters and len(self._waiters) > len(self._fills):
            waiter = self._waiters.popleft()  # it acquires as usual (and sees the error itself)
            if not waiter.done():
                waiter.set_result(None)
        if self._closed or self._loop is None:
            return
        self._backoff_until = time.monotonic() + delay
        if self._backoff is not None:
            self._backoff.cancel()
        self._backoff = self._loop.call_later(delay, self._after_backoff)
        self._pulse()

    def _after_backoff(self) -> None:
        self._backoff = None
        self._backoff_until = 0.0
        self._top_up()

    def _pulse(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- state ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The pool's state for monitors: plain values, safe to read from any thread."""
        backoff = max(0.0, self._backoff_until - time.monotonic())
        return {
            "provider": self.provider.name,
            "size": self.size,
            "low_water": self.low_water,
            "ready": len(self._ready),
            "filling": len(self._fills),
            "waiting": len(self._waiters),
            "handed_out": self.handed_out,
            "releasing": len(self._releases),
            "created": self.created,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "backoff_s": round(backoff, 3),
            "release_failures": self.release_failures,
            "closed": self._closed,
        }

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self._closed else f"{s['ready']}/{self.size} ready"
        return (f"<Pool {self.provider.name} {state}, {s['filling']} filling, "
                f"{s['handed_out']} handed out, {s['failures']} failures>")


def _close_open_pools(grace_s: float = 30.0) -> None:
    """Interpreter exit: close every pool left open, on its own loop."""
    from sandboxnb.interactive import _run_on

    for pool in open_pools():
        loop = pool._loop
        if loop is None:
            continue
        with contextlib.suppress(Exception):
            if loop.is_closed():  # its loop ended without closing it: destroy what is left
                asyncio.run(asyncio.wait_for(pool._abandon(), grace_s))
            else:
                _run_on(loop, asyncio.wait_for(pool.aclose(), grace_s), grace_s + 1)


async def _destroy(provider: Provider, state: _Acquired) -> None:
    if state.created:
        await provider.destroy(state.handle)
