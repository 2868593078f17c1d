"""The one owner of a notebook session's interactive sandboxes: launched by ``%sandbox launch``
or the launcher widget, held open by tasks on the kernel loop until stopped, released all together
at extension unload, kernel shutdown and interpreter exit.

Public API: :func:`manager` (the shared :class:`SandboxManager`), its ``prepare`` / ``start`` /
``wait_ready`` / ``stop`` / ``request_stop`` / ``stop_all`` / ``stop_all_async``, and
:func:`release_all`. Plain Python (no IPython, no widgets) so tests drive it directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandboxnb.config import RuntimeConfig, config_from_flat
from sandboxnb.errors import ConfigError, SandboxnbError, StartupTimeout
from sandboxnb.notebook.loop import Job, run_blocking, submit, wait_finished
from sandboxnb.options import OPTIONS, Option

__all__ = [
    "SandboxManager",
    "SandboxRecord",
    "current_manager",
    "manager",
    "release_all",
    "validate_launch",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    state: str = "starting"  # starting | running | stopping | stopped | failed
    started_at: float = field(default_factory=time.time)
    sandbox: Any = None
    error: str | None = None
    job: Job | None = field(default=None, repr=False)
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


class SandboxManager:
    """Owns interactive sandboxes. Each one is held open by a task on the kernel loop (the task
    that entered ``sandboxnb.launch(...)`` also exits it, on every path)."""

    def __init__(self) -> None:
        self._records: dict[str, SandboxRecord] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    # ---- observation -------------------------------------------------------------------
    def records(self, include_stopped: bool = False) -> list[SandboxRecord]:
        with self._lock:
            found = list(self._records.values())
        return [r for r in found if include_stopped or r.state in ("starting", "running")]

    def get(self, name: str) -> SandboxRecord | None:
        record = self._records.get(name)
        return record if record is not None and record.state in ("starting", "running") else None

    def names(self) -> list[str]:
        return [r.name for r in self.records()]

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
        while f"{prefix}{n}" in self._records and self._records[f"{prefix}{n}"].state in (
            "starting",
            "running",
        ):
            n += 1
        return f"{prefix}{n}"

    def prepare(self, provider: str, name: str | None = None, *,
                config: RuntimeConfig | None = None, **flat: Any) -> SandboxRecord:
        """Validate everything and reserve the name; nothing starts. Raises ConfigError."""
        if name is not None and not _NAME.match(name):
            raise ConfigError(
                f"name = {name!r} is not a valid Python identifier (it becomes a variable); "
                "use letters, digits and underscores, e.g. --name sb1"
            )
        _, config = validate_launch(provider, config, **flat)
        with self._lock:
            if name is None:
                name = self.free_name()
            elif self.get(name) is not None:
                raise ConfigError(
                    f"a sandbox named {name!r} is already running; pick another name "
                    f"or stop it first (%sandbox stop {name})"
                )
            record = SandboxRecord(name=name, provider=provider, config=config)
            self._records[name] = record
        return record

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
            self._changed()
            await record._stop.wait()
            record.state = "stopping"
            self._changed()

    def _ended(self, record: SandboxRecord, job: Job) -> None:
        """Final state once the holding task is over, however it ended (even if cancelled
        before it ever ran)."""
        error = None if job.cancelled() else job.exception()
        if error is not None and record.state == "starting":
            record.state, record.error = "failed", f"{type(error).__name__}: {error}"
        else:
            record.state = "stopped"
        _resolve(record.ready, error=error or SandboxnbError(
            f"sandbox {record.name} was stopped before it was ready"))
        self._changed()

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
        """Stop every sandbox (concurrently) and wait; returns their names."""
        records = self.records()
        for record in records:
            self._request_stop(record)
        self._wait_stopped(records, timeout)
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

