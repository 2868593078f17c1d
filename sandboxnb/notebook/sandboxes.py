"""The one owner of a notebook session's interactive sandboxes: launched by ``%sandbox launch``
or the launcher widget, held open by tasks on the kernel loop until stopped, released all together
at extension unload, kernel shutdown and interpreter exit.

A sandbox can also end on its own (its run timeout, a dead server): the task holding it watches
for that, and :meth:`SandboxManager.check_alive` asks each sandbox directly (a ping), so tables
show such a sandbox as ``ended`` with the reason instead of ``running``.

Public API: :func:`manager` (the shared :class:`SandboxManager`), its ``prepare`` / ``start`` /
``wait_ready`` / ``check_alive`` / ``stop`` / ``request_stop`` / ``stop_all`` /
``stop_all_async``, and :func:`release_all`. Plain Python (no IPython, no widgets) so tests drive
it directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.errors import ConfigError, SandboxError, SandboxnbError, StartupTimeout
from sandboxnb.notebook.loop import Job, run_blocking, submit, wait_finished
from sandboxnb.options import OPTIONS, Option, did_you_mean

__all__ = [
    "SandboxManager",
    "SandboxRecord",
    "current_manager",
    "manager",
    "release_all",
    "validate_launch",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: States of a sandbox that is (or is about to be) usable.
LIVE = ("starting", "running")
#: How often the task holding a sandbox looks whether it ended on its own (a flag read).
WATCH_S = 0.5
#: How long :meth:`SandboxManager.check_alive` waits for a sandbox's ping answer.
PING_S = 5.0


def validate_launch(
    provider: str, config: RuntimeConfig | None = None, **flat: Any
) -> tuple[Any, RuntimeConfig]:
    """Resolve the provider and build the effective config (``config`` with the flat runtime
    options applied); raise before anything starts.

    Raises :class:`ConfigError` (naming field, value and what is accepted) for an unknown
    provider or a bad or unsupported option.
    """
    from sandboxnb.providers import get_provider

    config = config_from_flat(config, **flat)
    instance = get_provider(provider)
    return instance, instance.check(config)


@dataclass
class SandboxRecord:
    """One interactive sandbox and its lifecycle state."""

    name: str
    provider: str
    config: RuntimeConfig
    #: starting | running | stopping | stopped (by us) | failed (to start) | ended (on its own)
    state: str = "starting"
    started_at: float = field(default_factory=time.time)
    sandbox: Any = None
    #: why it failed or ended
    error: str | None = None
    job: Job | None = field(default=None, repr=False)
    #: where its handle is published under its name while it runs (the notebook's namespace)
    namespace: MutableMapping[str, Any] | None = field(default=None, repr=False)
    _stop: asyncio.Event | None = field(default=None, repr=False)
    #: resolves to the client Sandbox once running, or to the launch error
    ready: concurrent.futures.Future = field(
        default_factory=concurrent.futures.Future, repr=False
    )

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop holding this sandbox (the kernel loop it was started on)."""
        return self.job.loop if self.job is not None else None

    @property
    def id(self) -> str | None:
        return getattr(self.sandbox, "id", None)

    @property
    def age_s(self) -> float:
        return time.time() - self.started_at

    @property
    def effective_config(self) -> RuntimeConfig:
        return getattr(self.sandbox, "config", None) or self.config

    def summary(self) -> dict[str, Any]:
        """A flat row for tables."""
        config, defaults = self.effective_config, RuntimeConfig()
        shown = {}
        for opt in OPTIONS:  # what differs from the config defaults, by option name
            value = _value_at(config, opt)
            if value != _value_at(defaults, opt):
                shown[opt.name] = "none" if value is None else str(value)
        return {
            "name": self.name,
            "provider": self.provider,
            "id": self.id or "",
            "age_s": round(self.age_s, 1),
            "config": ", ".join(f"{k}={v}" for k, v in shown.items()) or "provider defaults",
            "state": self.state,
            "error": self.error or "",
        }


def _value_at(config: RuntimeConfig, opt: Option) -> Any:
    value: Any = config
    for part in opt.path.split("."):
        value = getattr(value, part)
    return value


def config_difference(running: RuntimeConfig, asked: RuntimeConfig) -> str:
    """``cpu=1.0 (asked: 2.0), ...`` for every runtime option that differs."""
    parts = []
    for opt in OPTIONS:
        old, new = _value_at(running, opt), _value_at(asked, opt)
        if old != new:
            parts.append(f"{opt.name}={_shown(old)} (asked: {_shown(new)})")
    return ", ".join(parts)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def ended_reason(sandbox: Any) -> str | None:
    """Why a connected sandbox is gone (its run timeout, a lost connection), or None."""
    endpoint = getattr(sandbox, "endpoint", None)
    expired = endpoint.meta.get("run_timeout_expired") if endpoint is not None else None
    if expired is not None:
        return f"its run timeout ended it (limits.run_timeout_s = {expired:g} s)"
    if getattr(sandbox, "closed", False):
        return "its server went away"
    return None


class SandboxManager:
    """Owns interactive sandboxes. Each one is held open by a task on the kernel loop (the task
    that entered ``sandboxnb.launch(...)`` also exits it, on every path)."""

    def __init__(self) -> None:
        self._records: dict[str, SandboxRecord] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    # ---- observation -------------------------------------------------------------------
    def records(self, include_stopped: bool = False) -> list[SandboxRecord]:
        """Sandboxes starting, running, or ended on their own (until removed); every one ever
        launched with ``include_stopped``."""
        with self._lock:
            found = list(self._records.values())
        return [r for r in found if include_stopped or r.state in (*LIVE, "ended")]

    def get(self, name: str) -> SandboxRecord | None:
        """The starting or running sandbox called ``name``, else None."""
        record = self._records.get(name)
        return record if record is not None and record.state in LIVE else None

    def ended(self, name: str) -> SandboxRecord | None:
        """The sandbox called ``name`` if it ended on its own and is still listed."""
        record = self._records.get(name)
        return record if record is not None and record.state == "ended" else None

    def names(self) -> list[str]:
        """Names of the starting and running sandboxes."""
        return [r.name for r in self.records() if r.state in LIVE]

    def unknown_name(self, name: str) -> str:
        """The message for a name that is no running sandbox: did-you-mean, what runs, what
        ended and why."""
        ended = self.ended(name)
        if ended is not None:
            return (f"sandbox {name} has ended: {ended.error}; launch a new one with "
                    f"%sandbox launch --name {name}")
        running = self.names()
        return (f"no running sandbox named {name!r}{did_you_mean(name, running)}; running: "
                f"{', '.join(running) or 'none'} (see %sandbox ls)")

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every change (on the kernel loop thread, or the thread
        that made the change); returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self) -> None:
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener()

    # ---- lifecycle ---------------------------------------------------------------------
    def free_name(self, prefix: str = "sb") -> str:
        n = 1
        while f"{prefix}{n}" in self._records and self._records[f"{prefix}{n}"].state in LIVE:
            n += 1
        return f"{prefix}{n}"

    def prepare(self, provider: str, name: str | None = None, *,
                config: RuntimeConfig | None = None, replace: bool = False,
                namespace: MutableMapping[str, Any] | None = None,
                **flat: Any) -> SandboxRecord:
        """Validate everything and reserve the name; nothing starts. Raises ConfigError.

        A sandbox already running under ``name`` with the same provider and config is returned
        as it is (already started: ``record.job`` is set), so running a notebook twice reuses
        it. With another provider or config it is an error naming the differences, unless
        ``replace``: then the running one is stopped (waiting for its teardown) first.
        ``namespace`` receives the sandbox's handle under its name while it runs.
        """
        if name is not None and not _NAME.match(name):
            raise ConfigError(
                f"name = {name!r} is not a valid Python identifier (it becomes a variable); "
                "use letters, digits and underscores, e.g. --name sb1"
            )
        _, config = validate_launch(provider, config, **flat)
        current = self.get(name) if name is not None else None
        if current is not None:
            if current.provider == provider and current.config == config and not replace:
                if namespace is not None:
                    current.namespace = namespace
                    if current.state == "running":
                        self._publish(current)
                return current
            if not replace:
                raise ConfigError(self._conflict(current, provider, config))
            self.stop(current.name)
        with self._lock:
            if name is None:
                name = self.free_name()
            elif self.get(name) is not None:  # another launch took the name meanwhile
                raise ConfigError(
                    f"a sandbox named {name!r} is already running; pick another name "
                    f"or stop it first (%sandbox stop {name})"
                )
            record = SandboxRecord(name=name, provider=provider, config=config,
                                   namespace=namespace)
            self._records[name] = record
        return record

    @staticmethod
    def _conflict(current: SandboxRecord, provider: str, config: RuntimeConfig) -> str:
        if current.provider != provider:
            differs = f"provider={current.provider} (asked: {provider})"
        else:
            differs = config_difference(current.config, config)
        return (f"sandbox {current.name} is already running with another configuration: "
                f"{differs}; add --replace to stop it and launch a new one, or pick another "
                f"--name")

    def start(self, record: SandboxRecord) -> Job:
        """Start the sandbox of a prepared record on the kernel loop; returns at once and is
        safe from any thread (widget callbacks)."""
        record.job = submit(self._hold(record))
        record.job.add_done_callback(lambda job: self._ended(record, job))
        self._changed()
        return record.job

    async def _hold(self, record: SandboxRecord) -> None:
        from sandboxnb.interactive import launch

        record._stop = asyncio.Event()
        async with launch(record.provider, config=record.config) as sb:
            record.sandbox = sb
            record.state = "running"
            _resolve(record.ready, result=sb)
            self._publish(record)
            self._changed()
            reason = await self._watch(record, sb)
            if record.state == "running":  # check_alive may have marked it ended already
                record.state = "stopping" if reason is None else "ended"
                record.error = reason
            self._changed()

    @staticmethod
    async def _watch(record: SandboxRecord, sb: Any) -> str | None:
        """Wait for a stop request (None) or for the sandbox to end on its own (why)."""
        assert record._stop is not None
        stopping = asyncio.ensure_future(record._stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait([stopping], timeout=WATCH_S)
                if done:
                    return None
                if ended_reason(sb) is not None:
                    return await _why_gone(sb)
        finally:
            stopping.cancel()

    def _publish(self, record: SandboxRecord) -> None:
        from sandboxnb.notebook.handle import SandboxHandle

        if record.namespace is not None:
            current = record.namespace.get(record.name)
            if not (isinstance(current, SandboxHandle) and current._record is record):
                record.namespace[record.name] = SandboxHandle(record, self)

    @staticmethod
    def _unpublish(record: SandboxRecord) -> None:
        namespace = record.namespace
        if namespace is not None:
            current = namespace.get(record.name)
            if getattr(current, "_record", None) is record:
                with contextlib.suppress(KeyError):
                    del namespace[record.name]

    def _ended(self, record: SandboxRecord, job: Job) -> None:
        """Final state once the holding task is over, however it ended (even if cancelled
        before it ever ran). A sandbox that ended on its own keeps its state and handle, so
        tables and the handle say why; one stopped by request leaves the namespace."""
        error = None if job.cancelled() else job.exception()
        if error is not None and record.state == "starting":
            record.state, record.error = "failed", f"{type(error).__name__}: {error}"
        elif record.state != "ended":
            record.state = "stopped"
            self._unpublish(record)
        _resolve(record.ready, error=error or SandboxnbError(
            f"sandbox {record.name} was stopped before it was ready"))
        self._changed()

    def check_alive(self, timeout: float = PING_S) -> list[SandboxRecord]:
        """Ask every running sandbox whether it is still there (a ping answered within
        ``timeout``); mark the ones that are gone ``ended`` with the reason and wait for their
        release. Returns the records that ended."""
        records = [r for r in self.records() if r.state == "running" and r.job is not None]
        by_loop: dict[asyncio.AbstractEventLoop, list[SandboxRecord]] = {}
        for record in records:
            if not record.job.loop.is_closed():
                by_loop.setdefault(record.job.loop, []).append(record)
        ended: list[SandboxRecord] = []
        for loop, group in by_loop.items():
            run_blocking(self._probe_all(group, timeout, ended), loop=loop)
        if ended:
            self._wait_stopped(ended, 30.0)
            self._changed()
        return ended

    async def _probe_all(self, records: list[SandboxRecord], within_s: float,
                         ended: list[SandboxRecord]) -> None:
        await asyncio.sleep(0)  # let due timers (a run timeout) fire first
        probes = await asyncio.gather(*(_probe(r.sandbox, within_s) for r in records))
        for record, (reason, note) in zip(records, probes, strict=True):
            if record.state == "running" and reason is None:
                record.error = note
            elif record.state == "running":
                record.state, record.error = "ended", reason
                ended.append(record)
                if record._stop is not None:
                    record._stop.set()

    def forget(self, name: str) -> SandboxRecord | None:
        """Remove an ended sandbox from the tables (and its handle from the namespace)."""
        with self._lock:
            record = self._records.get(name)
            if record is None or record.state != "ended":
                return None
            del self._records[name]
        self._unpublish(record)
        self._changed()
        return record

    def wait_ready(self, record: SandboxRecord, timeout: float | None = None) -> SandboxRecord:
        """Block until ``record`` is running; re-raise its launch error. Interrupt cancels it."""
        job = record.job
        if job is None:
            raise SandboxnbError(f"sandbox {record.name} was never started")

        async def until_ready() -> None:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(record.ready)), timeout)
            except TimeoutError:
                raise StartupTimeout(f"sandbox {record.name} not ready after {timeout} s") from None
            except asyncio.CancelledError:  # interrupted: give the sandbox back first
                job.cancel()
                await wait_finished(job, 30)
                raise

        run_blocking(until_ready(), loop=job.loop)
        return record

    def stop(self, name: str, timeout: float = 30.0) -> SandboxRecord:
        """Stop one sandbox and wait for its teardown. KeyError if unknown."""
        record = self.get(name)
        if record is None:
            raise KeyError(name)
        self._request_stop(record)
        self._wait_stopped([record], timeout)
        return record

    def request_stop(self, name: str) -> None:
        """Ask one sandbox to stop and return at once (widget buttons; any thread)."""
        record = self.get(name)
        if record is not None:
            self._request_stop(record)

    def _request_stop(self, record: SandboxRecord) -> None:
        job = record.job
        if job is None:
            return
        if record.state == "starting" or record._stop is None:
            job.cancel()
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nothing left to stop
            job.loop.call_soon_threadsafe(record._stop.set)

    def stop_all(self, timeout: float = 30.0) -> list[str]:
        """Stop every sandbox (concurrently) and wait, and forget the ended ones; returns their
        names."""
        records = self.records()
        for record in records:
            self._request_stop(record)
        self._wait_stopped(records, timeout)
        for record in records:
            if record.state == "ended":
                self.forget(record.name)
        return [r.name for r in records]

    async def stop_all_async(self, within_s: float = 30.0) -> list[str]:
        """Stop every sandbox (concurrently) and wait up to ``within_s`` for their teardowns,
        awaiting on any loop (kernel shutdown runs it on the kernel loop); returns their names."""
        records = self.records()
        for record in records:
            self._request_stop(record)
        jobs = [r.job for r in records if r.job is not None and not r.job.finished()]
        if jobs:
            await asyncio.wait([asyncio.wrap_future(job) for job in jobs], timeout=within_s)
        return [r.name for r in records]

    @staticmethod
    def _wait_stopped(records: list[SandboxRecord], timeout: float) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        for record in records:
            if record.job is not None and not record.job.finished():
                by_loop.setdefault(record.job.loop, []).append(record.job)

        async def until_stopped(jobs: list[Job]) -> None:
            waits = [wait_finished(job, timeout) for job in jobs]
            for job, done in zip(jobs, await asyncio.gather(*waits), strict=True):
                if not done:  # a teardown that hangs: cancel it
                    job.cancel()
                    await wait_finished(job, 5)

        for loop, jobs in by_loop.items():
            if loop.is_closed():
                continue
            run_blocking(until_stopped(jobs), loop=loop)


async def _probe(sandbox: Any, within_s: float) -> tuple[str | None, str | None]:
    """(why ``sandbox`` is gone or None, a note if it is there but did not answer a ping
    within ``within_s``)."""
    reason = ended_reason(sandbox)
    if reason is not None and sandbox.closed:
        return await _why_gone(sandbox), None
    try:
        await asyncio.wait_for(sandbox.ping(), within_s)
    except TimeoutError:
        return ended_reason(sandbox), f"no answer to a ping within {within_s:g} s"
    except SandboxError:
        return await _why_gone(sandbox), None
    return ended_reason(sandbox), None


async def _why_gone(sandbox: Any) -> str:
    """The reason of a sandbox that ended: its run timeout, or why its connection was lost
    (a closed client raises it on the next call)."""
    reason = ended_reason(sandbox) or "its server went away"
    if "run timeout" in reason:
        return reason
    try:
        await sandbox.ping()
    except SandboxError as err:
        return f"its server went away ({err})"
    return reason


def _resolve(future: concurrent.futures.Future, *, result: Any = None,
             error: BaseException | None = None) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


_manager: SandboxManager | None = None


def manager() -> SandboxManager:
    """The process-wide manager shared by magics and widgets."""
    global _manager
    if _manager is None:
        _manager = SandboxManager()
    return _manager


def current_manager() -> SandboxManager | None:
    """The shared manager if this session has made one (nothing to release otherwise)."""
    return _manager


def release_all(timeout: float = 30.0) -> list[str]:
    """Stop every interactive sandbox of the session, wait for their teardowns and start afresh
    (extension unload, interpreter exit); returns the names stopped."""
    global _manager
    current, _manager = _manager, None
    return current.stop_all(timeout) if current is not None else []

